"""`tourray serve`: the tour guide as a Ray Serve application.

    HTTP ──► tour-ingress (FastAPI app of tourray.serve.app, no model)
                 ├─► tour-main     (TourModel: the model, N replicas)
                 └─► tour-compare  (TourModel: the second model, with --compare)

One deployment per model, so each scales (replicas) and batches on its own; the ingress only
validates, finds the pin's plus code and nearest city, and relays the model's events. On one machine
the embedded Ray runs it (`tourray serve --model DIR`); on a cluster the same application is deployed
with Serve's own tools through the builder `tourray.serve.deploy:app_builder`, e.g.

    serve run tourray.serve.deploy:app_builder model=/ckpt/small compare=/ckpt/original
    serve deploy serve.yaml        # import_path: tourray.serve.deploy:app_builder, args: {model: ...}

(`ray job submit -- tourray serve --model ...` runs the command itself on the cluster).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tourray.errors import UserError
from tourray.serve.config import ServeConfig

log = logging.getLogger("tourray")

APP_NAME = "tourray"


def check_config(cfg: ServeConfig) -> str:
    """Refuse what would fail inside a replica (a missing folder, an unreadable system prompt) here,
    with one error naming the flag; return the system prompt text."""
    from tourray.corpus.texts import read_system_prompt
    from tourray.serve.app import load_examples

    for flag, path in (("--model", cfg.model), ("--compare", cfg.compare)):
        if path is not None and not Path(path).expanduser().is_dir():
            raise UserError(f"{flag}: no such checkpoint folder {path!r}")
        if path is not None and not (Path(path) / "config.json").exists():
            raise UserError(f"{flag}: {path} is not a checkpoint folder (no config.json)")
    load_examples(examples_path(cfg))
    return read_system_prompt(cfg.system_prompt)


def examples_path(cfg: ServeConfig) -> Path:
    from tourray.serve.app import EXAMPLES_FILE

    return Path(cfg.examples) if cfg.examples else EXAMPLES_FILE


class TourIngress:
    """The ingress deployment: builds the FastAPI app on its replica, over handles of the models."""

    def __init__(self, settings: dict, main, compare=None):
        from tourray.serve.app import HandleEngine

        self.cfg = ServeConfig.model_validate(settings)
        self.engines = {"main": HandleEngine(main)}
        if compare is not None:
            self.engines["compare"] = HandleEngine(compare)

    def __serve_build_asgi_app__(self):
        from tourray.serve.app import create_app

        return create_app(self.engines, self.cfg.decoding, examples_path(self.cfg), self.cfg.stop_radius_km)


def build_application(cfg: ServeConfig):
    """The Ray Serve application (not yet running): ingress + one deployment per model."""
    from ray import serve

    from tourray.serve.engine import TourModel

    system_prompt = check_config(cfg)
    model = serve.deployment(TourModel)
    bound = {}
    for role, path in (("main", cfg.model), ("compare", cfg.compare)):
        if path is None:
            continue
        bound[role] = model.options(
            name=f"tour-{role}", num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
            ray_actor_options={"num_cpus": cfg.cpus_per_replica},
        ).bind(str(Path(path).resolve()), system_prompt, cfg.chat_template, role, cfg.replica_threads(), cfg.max_batch_size,
               cfg.batch_wait_ms)
    ingress = serve.deployment(serve.ingress()(TourIngress), name="tour-ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max(64, 4 * cfg.max_ongoing_requests))
    return ingress.bind(cfg.model_dump(mode="json"), **bound)


def app_builder(args: dict):
    """For `serve run tourray.serve.deploy:app_builder model=... compare=...` and Serve config files:
    `args` are ServeConfig fields (host and port are Serve's own settings there)."""
    return build_application(ServeConfig.parse(dict(args), source="serve args"))


def run_serve(cfg: ServeConfig, block: bool = True) -> str:
    """Start the app (Ray Serve, or uvicorn in this process with `in_process`); return its URL. With
    `block`, serve until interrupted, then shut Serve down."""
    url = f"http://{cfg.host}:{cfg.port}/"
    if cfg.in_process:
        import uvicorn

        from tourray.serve.app import create_app
        from tourray.serve.engine import TourModel

        system_prompt = check_config(cfg)
        engines = {role: TourModel(path, system_prompt, cfg.chat_template, role, cfg.replica_threads(), cfg.max_batch_size,
                                   cfg.batch_wait_ms)
                   for role, path in (("main", cfg.model), ("compare", cfg.compare)) if path}
        app = create_app(engines, cfg.decoding, examples_path(cfg), cfg.stop_radius_km)
        print(f"tourray serve (in process): {url}", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
        return url
    from ray import serve

    from tourray.runtime import init_ray

    application = build_application(cfg)  # checks before Ray starts
    init_ray(cfg.address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.perf_counter()
    serve.run(application, name=APP_NAME, route_prefix="/")
    print(f"tourray serve: {url} (Ray Serve app {APP_NAME!r}: tour-ingress + "
          f"{', '.join('tour-' + r for r in ('main', 'compare') if (cfg.model if r == 'main' else cfg.compare))}; "
          f"ready in {time.perf_counter() - t0:.0f} s). Ctrl-C stops it.", flush=True)
    if not block:
        return url
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
    return url
