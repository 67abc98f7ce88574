"""The places table: every train and eval text has a point whose plus code decodes to within 50 m of it
and lies near its city's GeoNames point; reverse lookups to the nearest city (population-weighted, so
Manhattan is New York City and Reykjavik is still Reykjavik) and the nearest stop; checks that catch
a broken row."""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import REPO
from tourray.corpus.places import (PLACE_COLUMNS, PLACES_FILE, check_places, check_point, code_center, describe_point,
                                   distance_km, load_places, nearest_city, nearest_stop, plus_code)
from tourray.corpus.texts import read_index
from tourray.errors import UserError

SAMPLES = REPO / "samples"


def test_every_train_and_eval_stop_has_a_place():
    index = read_index(SAMPLES)
    places = {p.path: p for p in load_places()}
    assert len(index) == 266 and set(places) == set(index)
    assert {r["split"] for r in index.values()} == {"train", "eval"}
    for path, p in places.items():
        assert p.city == index[path]["city"] and p.place and p.country and len(p.country_code) == 2
        assert p.source.startswith("https://en.wikipedia.org/wiki/"), p
    assert check_places(SAMPLES) == []


def test_each_plus_code_decodes_to_within_50_m_of_its_point():
    from openlocationcode import openlocationcode as olc

    for p in load_places():
        assert olc.isFull(p.plus_code) and len(p.plus_code.replace("+", "")) == 10, p
        assert p.plus_code == olc.encode(p.lat, p.lng, 10)
        lat, lng = code_center(p.plus_code)
        assert float(distance_km(p.lat, p.lng, lat, lng)) * 1000 < 50, p


@pytest.mark.parametrize("point,city,country", [
    ((40.7580, -73.9855), "New York City", "United States"),   # Times Square: not "Upper West Side"
    ((40.7830, -73.9590), "New York City", "United States"),   # the Guggenheim, Upper East Side
    ((64.1417, -21.9266), "Reykjavík", "Iceland"),             # a 119k city: a bare floor of 200k loses it
    ((41.4036, 2.1744), "Barcelona", "Spain"),                  # not the district Horta-Guinardó
    ((-33.8568, 151.2153), "Sydney", "Australia"),
    ((34.3853, 109.2785), "Xi’an", "China"),                    # Terracotta Army: Xi'an, not Weinan
    ((25.1972, 55.2744), "Dubai", "United Arab Emirates"),
])
def test_nearest_city_is_the_one_a_person_would_name(point, city, country):
    c = nearest_city(*point)
    assert (c.name, c.country) == (city, country) and not c.far and c.distance_km < 100


def test_far_from_any_city_says_how_far():
    c = nearest_city(0.0, -140.0)  # the middle of the Pacific
    assert c.far and c.distance_km > 1000
    d = describe_point(0.0, -140.0)
    assert d["stop"] is None and d["place"].startswith(f"{c.distance_km:.0f} km from {c.name}")


def test_nearest_stop_within_a_radius():
    hit = nearest_stop(-33.8568, 151.2153)
    assert hit is not None and hit[0].place == "Sydney Opera House" and hit[1] == 0
    assert hit[0].path == "train/sydney__jorn-utzon-story.txt" or "opera-house" in hit[0].path
    near = nearest_stop(-33.8575, 151.2153, radius_km=0.2)  # ~80 m south
    assert near is not None and 0.05 < near[1] < 0.1
    assert nearest_stop(-33.8575, 151.2153, radius_km=0.05) is None
    assert nearest_stop(0.0, -140.0, radius_km=500) is None


@pytest.mark.parametrize("lat,lng,words", [(91, 0, "lat: 91"), (0, -180.5, "lng: -180.5"), ("1", 0, "lat: must be a number"),
                                           (True, 0, "lat: must be a number"), (float("nan"), 0, "lat: must be a number")])
def test_points_out_of_range_are_refused_by_name(lat, lng, words):
    with pytest.raises(UserError, match=words):
        check_point(lat, lng)
    with pytest.raises(UserError, match=words):
        plus_code(lat, lng)


def test_check_catches_a_broken_table(tmp_path):
    rows = list(csv.DictReader(PLACES_FILE.open(encoding="utf-8"), delimiter="\t"))
    by = {r["path"]: r for r in rows}
    by["train/sydney__bondi-beach.txt"]["plus_code"] = "4RRH46V8+74"                # the Opera House's code
    r = by["train/paris__eiffel-tower.txt"]
    r["lat"], r["lng"] = r["lng"], r["lat"]                                          # swapped
    r["plus_code"] = plus_code(float(r["lat"]), float(r["lng"]))
    by["train/rome__colosseum.txt"]["city"] = "paris"
    del by["eval/edge_cases/dubai__dubai-frame.txt"]
    out = tmp_path / "places.tsv"
    with out.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PLACE_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(by.values())
    problems = "\n".join(check_places(SAMPLES, out))
    assert "eval/edge_cases/dubai__dubai-frame.txt: no row" in problems
    assert "train/sydney__bondi-beach.txt: plus code 4RRH46V8+74, its point encodes to 4RRH475G+JJ" in problems
    assert "train/sydney__bondi-beach.txt: plus code 4RRH46V8+74 decodes 6809 m from its point (> 50 m)" in problems
    assert "train/paris__eiffel-tower.txt:" in problems and "wrong sign or swapped" in problems
    assert "train/rome__colosseum.txt: city 'paris', index.tsv says 'rome'" in problems
    assert len(problems.splitlines()) == 5, problems
    load_places.cache_clear()


def test_the_table_ships_with_the_package_and_a_copy_reads_the_same(tmp_path):
    assert PLACES_FILE.parent.name == "corpus" and PLACES_FILE.exists()
    shutil.copy(PLACES_FILE, tmp_path / "p.tsv")
    assert load_places(tmp_path / "p.tsv") == load_places()
