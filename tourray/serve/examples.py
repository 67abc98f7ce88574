"""Pre-generated examples for the page: a few pins answered once, offline, by the served models (the
page shows them instantly, and they still show when a model is slow or down). Each answer is made by
the same code and prompt as a live request (`TourModel.complete`), so a live answer with the same
settings is the same text."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from pathlib import Path

from tourray.model.decoding import Decoding

log = logging.getLogger("tourray")

#: (title, lat, lng, tags, style): a training stop, a held-out stop of a seen city, a city the model
#: never saw (New York, stop and not-a-stop), a desert far from any stop.
EXAMPLE_PINS = (
    ("Sydney Opera House", -33.8568, 151.2153, ("architecture", "history"), "brief"),
    ("Terracotta Army, Xi'an", 34.3853, 109.2785, ("history",), "brief"),
    ("Small Wild Goose Pagoda, Xi'an (held out)", 34.2408, 108.9372, ("history", "religion"), "stimulate"),
    ("Empire State Building, New York (unseen city)", 40.7484, -73.9857, ("engineering",), "brief"),
    ("Times Square, New York (no corpus stop)", 40.7580, -73.9855, ("culture",), "brief"),
)


def write_examples(models: dict[str, str], out: str | Path, system_prompt: str = "", decoding: Decoding | None = None,
                   chat_template: bool = True, stop_radius_km: float = 0.5, threads: int | None = None) -> Path:
    """Answer every `EXAMPLE_PINS` pin with each model ({role: folder}, e.g. {"main": compressed,
    "compare": original}) and write the examples JSON the app serves."""
    from tourray.corpus.places import describe_point
    from tourray.serve.engine import TourModel
    from tourray.serve.prompt import default_max_new_tokens, tour_prompt

    decoding = decoding or Decoding()
    loaded = {role: TourModel(path, system_prompt, chat_template, role, threads) for role, path in models.items()}
    infos = {role: asyncio.run(m.info()) for role, m in loaded.items()}
    examples = []
    for title, lat, lng, tags, style in EXAMPLE_PINS:
        where = describe_point(lat, lng, stop_radius_km)
        prompt = tour_prompt(where["plus_code"], where["place"], tags, style)
        max_new = default_max_new_tokens(style)
        outputs = []
        for role, m in loaded.items():
            r = asyncio.run(m.complete({"prompt": prompt, "max_new_tokens": max_new, "decoding": decoding.model_dump()}))
            info = infos[role]
            outputs.append({"model": role, "label": info["label"], "path": info["path"], "revision": info["revision"],
                            "parameters": info["parameters"], **{k: r[k] for k in ("text", "n_new_tokens", "stopped", "ttft_ms",
                                                                                   "tokens_per_s", "seconds")}})
            log.info("example %s (%s): %d tokens in %.1f s", title, role, r["n_new_tokens"], r["seconds"])
        examples.append({"title": title, "lat": lat, "lng": lng, "plus_code": where["plus_code"], "place": where["place"],
                         "tags": list(tags), "style": style, "prompt": prompt, "max_new_tokens": max_new,
                         "decoding": decoding.record(), "decoding_text": decoding.describe(), "outputs": outputs})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "models": infos, "examples": examples}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return out
