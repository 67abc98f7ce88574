"""tourray: a streaming data lake for the insides of language models.

Public API (cheap to import: torch, transformers and ray load only when used)::

    from tourray import CaptureConfig, run_capture, connect
    summary = run_capture(CaptureConfig(model="Qwen/Qwen3-0.6B", samples="samples/", run="q06"))
    con = connect("lake")          # DuckDB connection with a view per table
    con.sql("SELECT layer, count(*) FROM activations GROUP BY layer").show()
"""

__version__ = "0.1.0"

__all__ = ["CaptureConfig", "Lake", "UserError", "build_capture", "connect", "run_capture", "verify"]


def __getattr__(name):  # lazy re-exports keep `import tourray` light
    if name in ("CaptureConfig", "build_capture", "run_capture"):
        from tourray import capture

        return getattr(capture, name)
    if name == "Lake":
        from tourray.lake import Lake

        return Lake
    if name == "connect":
        from tourray.sql import connect

        return connect
    if name == "verify":
        from tourray.verify import verify

        return verify
    if name == "UserError":
        from tourray.errors import UserError

        return UserError
    raise AttributeError(f"module 'tourray' has no attribute {name!r}")
