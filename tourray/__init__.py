"""tourray: a streaming data lake for the insides of language models.

Public API (cheap to import: torch, transformers and ray load only when used)::

    from tourray import CaptureConfig, StatsConfig, run_capture, run_stats, connect
    summary = run_capture(CaptureConfig(model="Qwen/Qwen3-0.6B", samples="samples/", run="q06"))
    run_stats(StatsConfig(lake="lake", run="q06", pairs="all"))   # layer_stats, pair_stats, moments
    con = connect("lake")          # DuckDB connection with a view per table
    con.sql("SELECT layer_a, layer_b, cka FROM pair_stats WHERE run = 'q06'").show()
"""

__version__ = "0.1.0"

__all__ = ["CaptureConfig", "CrossMoments", "HealConfig", "Lake", "Moments", "Selection", "SoupConfig", "StatsConfig",
           "UserError", "build_capture", "connect", "run_capture", "run_heal", "run_soup", "run_stats", "verify"]


def __getattr__(name):  # lazy re-exports keep `import tourray` light
    if name in ("CaptureConfig", "build_capture", "run_capture"):
        from tourray import capture

        return getattr(capture, name)
    if name in ("StatsConfig", "run_stats"):
        from tourray.stats import tasks

        return getattr(tasks, name)
    if name in ("Moments", "CrossMoments"):
        from tourray.stats import moments

        return getattr(moments, name)
    if name in ("HealConfig", "SoupConfig"):
        from tourray.heal import config

        return getattr(config, name)
    if name == "run_heal":
        from tourray.heal.train import run_heal

        return run_heal
    if name == "run_soup":
        from tourray.heal.soup import run_soup

        return run_soup
    if name == "Selection":
        from tourray.stats.stream import Selection

        return Selection
    if name == "Lake":
        from tourray.lake.tables import Lake

        return Lake
    if name == "connect":
        from tourray.lake.sql import connect

        return connect
    if name == "verify":
        from tourray.lake.verify import verify

        return verify
    if name == "UserError":
        from tourray.errors import UserError

        return UserError
    raise AttributeError(f"module 'tourray' has no attribute {name!r}")
