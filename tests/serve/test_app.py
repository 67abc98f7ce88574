"""The tour guide's API through FastAPI's TestClient (no Ray): every endpoint, the streamed events and
the final object, the served text against `tourray generate` for the same prompt and settings,
batching, and every kind of bad input (a 4xx naming the field; the server keeps serving)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from serve_fixtures import SYS, chatty_llama, chatty_qwen3, engines, one_thread, system_prompt_file  # noqa: F401
from tourray.corpus.places import load_places, plus_code
from tourray.model.decoding import TOUR_DECODING
from tourray.serve.prompt import STYLES, TAGS

OPERA = (-33.8568, 151.2153)
TIMES_SQUARE = (40.7580, -73.9855)


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ex") / "examples.json"
    p.write_text(json.dumps({"generated_at": "2026-12-05 00:00 UTC", "examples": [
        {"title": "Opera House", "lat": OPERA[0], "lng": OPERA[1], "plus_code": "4RRH46V8+74", "place": "x",
         "tags": ["history"], "style": "brief", "outputs": []}]}))
    return p


@pytest.fixture(scope="module")
def client(engines, examples_file):  # noqa: F811
    from fastapi.testclient import TestClient

    from tourray.serve.app import create_app

    return TestClient(create_app(engines, TOUR_DECODING, examples_file))


def sse(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in resp.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [json.loads(b[len("data: "):]) for b in blocks]


def tour(client, stream=True, **over):
    body = dict(lat=OPERA[0], lng=OPERA[1], tags=["architecture", "history"], style="brief", max_new_tokens=12,
                stream=stream) | over
    return client.post("/api/tour", json=body)


# -- the read-only endpoints -----------------------------------------------------------------
def test_page_and_read_endpoints(client, examples_file):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/vendor/leaflet-1.9.4/leaflet.js" in page.text and 'id="map"' in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/vendor/leaflet-1.9.4/leaflet.css",
                  "/static/vendor/topojson-client-3.1.0/topojson-client.min.js",
                  "/static/vendor/world-atlas-2.0.2/countries-50m.json", "/static/vendor/leaflet-1.9.4/images/marker-icon.png"):
        assert client.get(asset).status_code == 200, asset
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"main", "compare"}
    for name, info in health["models"].items():
        assert info["name"] == name and info["parameters"] > 0 and info["layers"] in (2, 3)
        assert info["revision"].startswith("st-sha256:")
    opts = client.get("/api/options").json()
    assert [t["id"] for t in opts["tags"]] == list(TAGS)
    assert [s["id"] for s in opts["styles"]] == list(STYLES)
    assert opts["max_new_tokens"] == {"min": 1, "max": 512}
    assert opts["decoding"]["repetition_penalty"] == 1.1 and opts["decoding"]["no_repeat_ngram_size"] == 4
    assert "GeoNames" in opts["attribution"]["cities"] and "CC BY" in opts["attribution"]["cities"]
    places = client.get("/api/places").json()["places"]
    assert len(places) == len(load_places()) and {p["split"] for p in places} == {"train", "eval"}
    assert client.get("/api/examples").json() == json.loads(examples_file.read_text())


def test_where_names_the_stop_or_the_city(client):
    w = client.get("/api/where", params=dict(lat=OPERA[0], lng=OPERA[1])).json()
    assert w["plus_code"] == plus_code(*OPERA) == "4RRH46V8+74"
    assert w["stop"]["place"] == "Sydney Opera House" and w["city"]["name"] == "Sydney"
    assert w["place"] == "Sydney Opera House, Sydney, Australia"
    w = client.get("/api/where", params=dict(lat=TIMES_SQUARE[0], lng=TIMES_SQUARE[1])).json()
    assert w["stop"] is None and w["city"]["name"] == "New York City"  # not a neighbourhood
    assert w["place"] == "New York City, United States"
    for params, field in ((dict(lat="abc", lng=1), "lat"), (dict(lat=1), "lng"), (dict(lat=95, lng=1), "lat"),
                          (dict(lat=1, lng=-181), "lng"), (dict(lat="nan", lng=1), "lat")):
        r = client.get("/api/where", params=params)
        assert r.status_code == 422 and r.json()["field"] == field, (params, r.text)


def test_static_files_load_nothing_from_elsewhere():
    from tourray.serve.app import STATIC_DIR

    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/static/") for r in refs), refs
    js = (STATIC_DIR / "app.js").read_text()
    fetched = re.findall(r'(?:fetch|getJSON)\(\s*[`"]([^`"]+)', js)
    assert fetched and all(f.startswith("/") for f in fetched), fetched
    assert not re.search(r"url\(\s*['\"]?https?:", (STATIC_DIR / "style.css").read_text())
    for lib in ("leaflet-1.9.4", "topojson-client-3.1.0", "world-atlas-2.0.2"):
        assert (STATIC_DIR / "vendor" / lib / "LICENSE").stat().st_size > 100, lib


# -- POST /api/tour ----------------------------------------------------------------------------
def test_stream_sends_tokens_then_the_done_object(client):
    events = sse(tour(client))
    *tokens, done = events
    assert tokens and all(set(e) == {"token"} for e in tokens)
    assert done["done"] is True and "".join(e["token"] for e in tokens) == done["text"]
    assert done["plus_code"] == "4RRH46V8+74" and done["place"] == "Sydney Opera House, Sydney, Australia"
    assert done["prompt"] == ("I'm at Sydney Opera House, Sydney, Australia (plus code 4RRH46V8+74). I'm interested in "
                              "history and architecture. Tell me about this stop. " + STYLES["brief"][0])
    assert 1 <= done["n_new_tokens"] <= 12 and done["max_new_tokens"] == 12
    assert done["ttft_ms"] > 0 and done["seconds"] * 1000 >= done["ttft_ms"]
    assert done["tokens_per_s"] is None or done["tokens_per_s"] > 0
    assert done["decoding_text"] == "greedy, repetition penalty 1.1, no repeated 4-grams"
    assert done["model"] == "main" and done["model_info"]["parameters"] > 0
    plain = tour(client, stream=False)
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
    assert {k: v for k, v in plain.json().items() if k not in ("ttft_ms", "tokens_per_s", "seconds", "queued_ms", "batch_size")} \
        == {k: v for k, v in done.items() if k not in ("ttft_ms", "tokens_per_s", "seconds", "queued_ms")}


def test_style_default_lengths_and_the_compare_model(client):
    done = sse(tour(client, model="compare", style="detailed", max_new_tokens=None, tags=[]))[-1]
    assert done["max_new_tokens"] == STYLES["detailed"][2] and done["model"] == "compare"
    assert "I'm interested" not in done["prompt"] and done["prompt"].endswith(STYLES["detailed"][0])


def _generate_cli(tmp_path, model, prompt, max_new, *flags):
    from tourray.cli import main

    (tmp_path / "p.txt").write_text(prompt + "\n", encoding="utf-8")
    out = tmp_path / "g.jsonl"
    assert main(["-q", "generate", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--system-prompt",
                 str(tmp_path / "s.md"), "--max-new-tokens", str(max_new), "--out", str(out), *flags]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("model,decoding,flags", [
    ("main", None, ["--repetition-penalty", "1.1", "--no-repeat-ngram-size", "4"]),
    ("compare", None, ["--repetition-penalty", "1.1", "--no-repeat-ngram-size", "4"]),
    ("main", {"sample": True, "seed": 5, "temperature": 0.9}, ["--repetition-penalty", "1.1", "--no-repeat-ngram-size", "4",
                                                              "--sample", "--seed", "5", "--temperature", "0.9"]),
    ("main", {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}, []),  # plain greedy, generate's default
])
def test_served_text_equals_tourray_generate(client, engines, tmp_path, model, decoding, flags):  # noqa: F811
    (tmp_path / "s.md").write_text(SYS + "\n")
    body = dict(model=model, max_new_tokens=16, tags=["food"], style="stimulate") | ({"decoding": decoding} if decoding else {})
    done = sse(tour(client, **body))[-1]
    want = _generate_cli(tmp_path, engines[model].gen.model.name_or_path, done["prompt"], 16, *flags)
    assert done["text"] == want["text"] and done["n_new_tokens"] == want["n_new_tokens"]
    assert want["n_new_tokens"] >= 4 and len(set(want["token_ids"])) > 2  # a real text, not one token repeated
    again = tour(client, stream=False, **body).json()
    assert again["text"] == want["text"]


def test_sampling_follows_the_seed(client):
    texts = {seed: sse(tour(client, max_new_tokens=16, decoding={"sample": True, "seed": seed}))[-1]["text"] for seed in (1, 2)}
    assert texts[1] != texts[2]
    assert sse(tour(client, max_new_tokens=16, decoding={"sample": True, "seed": 1}))[-1]["text"] == texts[1]


def test_batched_requests_get_what_they_get_alone(engines):  # noqa: F811
    model = engines["compare"]  # max_batch_size 4, 200 ms wait
    prompts = ["I'm at A. Tell me about this stop.", "Hi", "I'm at a much longer place name, Sydney. Tell me more about it.", "x"]
    alone = [model.gen([p], 10, decoding=TOUR_DECODING)[0]["text"] for p in prompts]

    async def together():
        reqs = [{"prompt": p, "max_new_tokens": 10, "decoding": TOUR_DECODING.model_dump()} for p in prompts]
        return await asyncio.gather(*(model.complete(r) for r in reqs))

    got = asyncio.run(together())
    assert [g["text"] for g in got] == alone
    assert [g["batch_size"] for g in got] == [4, 4, 4, 4]


# -- bad input ---------------------------------------------------------------------------------
GOOD = dict(lat=OPERA[0], lng=OPERA[1], tags=["history"], style="brief", max_new_tokens=4, stream=False)

BAD = [  # (body or raw bytes, status, field)
    (GOOD | {"lat": 91}, 422, "lat"),
    (GOOD | {"lat": -90.5}, 422, "lat"),
    (GOOD | {"lng": 180.01}, 422, "lng"),
    (GOOD | {"lat": "33.8"}, 422, "lat"),            # a string is not a number
    (GOOD | {"lng": True}, 422, "lng"),
    (GOOD | {"lat": None}, 422, "lat"),
    ({k: v for k, v in GOOD.items() if k != "lng"}, 422, "lng"),
    (b'{"lat": NaN, "lng": 1}', 422, "lat"),
    (b'{"lat": 1, "lng": Infinity}', 422, "lng"),
    (GOOD | {"tags": ["history", "ghosts"]}, 422, "tags"),
    (GOOD | {"tags": "history"}, 422, "tags"),
    (GOOD | {"tags": [1]}, 422, "tags.0"),
    (GOOD | {"style": "loud"}, 422, "style"),
    (GOOD | {"style": 2}, 422, "style"),
    (GOOD | {"max_new_tokens": 0}, 422, "max_new_tokens"),
    (GOOD | {"max_new_tokens": 513}, 422, "max_new_tokens"),
    (GOOD | {"max_new_tokens": 1.5}, 422, "max_new_tokens"),
    (GOOD | {"max_new_tokens": "8"}, 422, "max_new_tokens"),
    (GOOD | {"stream": "yes"}, 422, "stream"),
    (GOOD | {"model": "gpt"}, 422, "model"),
    (GOOD | {"decoding": {"temperature": 0}}, 422, "decoding.temperature"),
    (GOOD | {"decoding": {"no_repeat_ngram_size": -1}}, 422, "decoding.no_repeat_ngram_size"),
    (GOOD | {"decoding": {"beams": 4}}, 422, "decoding.beams"),
    (GOOD | {"decoding": "greedy"}, 422, "decoding"),
    (GOOD | {"colour": "red"}, 422, "colour"),
    (b'{"lat": 1, "lng": ', 400, "body"),
    (b"", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b'"text"', 400, "body"),
    (b"\xff\xfe{}", 400, "body"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(client, body, status, field):
    r = client.post("/api/tour", content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
        else client.post("/api/tour", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(field + ": "), err
    assert err["errors"][0]["field"] == field


def test_the_server_keeps_serving_after_bad_input(client):
    for body, _, _ in BAD[:5]:
        client.post("/api/tour", json=body) if isinstance(body, dict) else client.post("/api/tour", content=body)
    r = client.post("/api/tour", json=GOOD)
    assert r.status_code == 200 and r.json()["done"] is True
