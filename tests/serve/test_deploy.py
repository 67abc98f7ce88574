"""`tourray serve` on Ray Serve itself (the embedded Ray): one deployment per model behind the FastAPI
ingress, over real HTTP: health, a streamed answer equal to the in-process model's, a 4xx naming the
field, and the refusals before anything starts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import free_port
from serve_fixtures import SYS, chatty_llama, chatty_qwen3, engines, one_thread, system_prompt_file  # noqa: F401
from tourray.errors import UserError
from tourray.serve.config import ServeConfig


def post(url, body) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_ray_serve_app_end_to_end(ray_session, chatty_llama, chatty_qwen3, system_prompt_file, engines):  # noqa: F811
    import asyncio

    from ray import serve

    from tourray.serve.deploy import run_serve

    port = free_port()
    cfg = ServeConfig(model=str(chatty_llama), compare=str(chatty_qwen3), port=port, system_prompt=str(system_prompt_file),
                      cpus_per_replica=0.25, threads=1)
    url = run_serve(cfg, block=False)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "api/health", timeout=60) as r:
            health = json.loads(r.read())
        assert set(health["models"]) == {"main", "compare"} and health["models"]["compare"]["layers"] == 3
        with urllib.request.urlopen(url, timeout=60) as r:
            assert b'id="map"' in r.read()
        body = dict(lat=-33.8568, lng=151.2153, tags=["history"], style="brief", max_new_tokens=10, stream=True)
        status, text = post(url + "api/tour", body)
        assert status == 200, text
        events = [json.loads(b[len("data: "):]) for b in text.split("\n\n") if b.strip()]
        done = events[-1]
        assert done["done"] and "".join(e["token"] for e in events[:-1]) == done["text"]
        assert done["plus_code"] == "4RRH46V8+74" and done["place"] == "Sydney Opera House, Sydney, Australia"
        req = {"prompt": done["prompt"], "max_new_tokens": 10, "decoding": cfg.decoding.model_dump()}
        assert done["text"] == asyncio.run(engines["main"].complete(req))["text"]  # the same model in this process
        status, text = post(url + "api/tour", body | {"model": "compare", "stream": False})
        assert status == 200 and json.loads(text)["model"] == "compare"
        status, text = post(url + "api/tour", body | {"lat": 123})
        assert status == 422 and json.loads(text)["field"] == "lat"
        status, text = post(url + "api/tour", body)  # still serving
        assert status == 200
    finally:
        serve.shutdown()


def test_refusals_before_anything_starts(tmp_path, chatty_llama):  # noqa: F811
    from tourray.serve.deploy import app_builder, check_config

    with pytest.raises(UserError, match="--model: no such checkpoint folder"):
        check_config(ServeConfig(model=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="--compare: .* is not a checkpoint folder"):
        check_config(ServeConfig(model=str(chatty_llama), compare=str(tmp_path), system_prompt=None))
    with pytest.raises(UserError, match="--system-prompt: .* does not exist"):
        check_config(ServeConfig(model=str(chatty_llama), system_prompt=str(tmp_path / "none.md")))
    (tmp_path / "ex.json").write_text("[1]")
    with pytest.raises(UserError, match="--examples: .* must be a JSON object"):
        check_config(ServeConfig(model=str(chatty_llama), system_prompt=None, examples=str(tmp_path / "ex.json")))
    with pytest.raises(UserError, match="port"):
        app_builder({"model": str(chatty_llama), "port": 0})
    app = app_builder({"model": str(chatty_llama), "system_prompt": None})  # what `serve run` / a Serve config imports
    assert type(app).__name__ == "Application"
