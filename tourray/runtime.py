"""Where work runs: embedded Ray on one machine, or a Ray cluster; and where the lake lives.

Only the driver calls these, but for `keep_freed_memory`, which each process that runs a stage
calls on itself; stages never start Ray.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import queue
import sys
import threading
import warnings
import traceback
from pathlib import Path
from typing import Callable, Iterator

from tourray.errors import UserError

log = logging.getLogger("tourray")


def resolve_uri(path: str | os.PathLike) -> str:
    """A lake root as a URI every process can open: URIs (s3://, gs://, ...) pass through, local
    paths become absolute (so `ray job submit --working-dir` copies do not swallow the output)."""
    s = str(path)
    if "://" in s:
        return s.rstrip("/")
    return str(Path(s).expanduser().resolve())


#: glibc's own malloc settings; a user who sets any of them keeps glibc's behaviour as set.
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process instead of giving it back at once.

    By default glibc unmaps or trims every freed block above 128 KiB-32 MiB, so a batched forward's
    temporaries (and inline statistics' float64 copies) fault their pages in again on every batch:
    ~10 million minor page faults in a 16-text SmolLM2 capture in one process, 0.81-0.85x the plain
    forward with units statistics against 0.94-0.98x with these settings; through Ray no difference
    was measured (bench/results/capture_steady.md). Peak memory is
    unchanged; what is kept is what the process already used. Called by each process that runs a
    `Stage`; a no-op off glibc or when the user set any MALLOC_* variable above. Returns whether it
    applied."""
    if sys.platform != "linux" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    # blocks up to 32 MiB (glibc's ceiling for this) from the heap; the heap never trimmed; grown 64 MiB at a time
    return all(mallopt(p, v) == 1 for p, v in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, (1 << 31) - 1),
                                                (m_top_pad, 64 << 20)))


def has_state_api() -> bool:
    """Whether the Ray this process is connected to serves Ray's state API, i.e. runs a dashboard: an
    embedded Ray (started without one by `init_ray`) or a cluster started with --include-dashboard=false
    does not, and a question to it blocks until its timeout."""
    from ray._private.worker import get_dashboard_url

    return bool(get_dashboard_url())


def init_ray(address: str | None = None, quiet: bool = True):
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray.

    A job submitted with `ray job submit` already has RAY_ADDRESS set, so the same script runs
    embedded or on a cluster unchanged.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    # "local" really starts a new embedded Ray; None would silently join a `ray start` cluster.
    kwargs = dict(log_to_driver=not quiet, include_dashboard=False) if address is None else {}
    # Ray's start-up noise, explained once here instead of printed on every run:
    # - Ray 2.60 turns token authentication on for a new embedded cluster and warns about it; that is
    #   what tourray wants (a private cluster), so the notice is dropped (RAY_AUTH_MODE still decides).
    # - "lance is not fork-safe" fires whenever this process forks after importing lance: Ray's own
    #   process launches fork and exec at once, and no Lance state crosses them, so it is harmless.
    # - A capture's actor pool passes max_restarts / max_task_retries (tourray.capture.driver.MAX_TRIES)
    #   to map_batches as extra remote args, the only way Ray Data 2.60 has to set them, which it reports
    #   as deprecated (removal announced for Ray 2.64: move them once Ray Data names them). Ray's core
    #   then logs "Actor ... has constructor arguments in the object store and max_restarts > 0 ..." for
    #   every such pool (Ray Data itself passes its context and transform by reference); those objects
    #   belong to this driver and live as long as the pool, so the restarts work: see
    #   `_spend_actor_restart_warning`.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module="tourray.capture.driver")
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    if address is None and "RAY_AUTH_MODE" not in os.environ:
        auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address=address or "local", ignore_reinit_error=True, logging_level=logging.WARNING, **kwargs)
    finally:
        auth_log.setLevel(level)
    _spend_actor_restart_warning(ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # tourray draws its own bar with samples/s and tokens/s
    ctx.print_on_execution_start = False
    # ... so Ray Data's notice that its bars are off, and its per-dataset "execution finished in N s"
    # (tourray logs each capture's own summary), are noise here
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    log.info("ray: %s", "embedded local cluster" if address is None else f"cluster at {address}")
    return ray


def _spend_actor_restart_warning(ray) -> None:
    """Ray's core prints the actor-restart warning (see `init_ray`) from C++, once per process and
    past Python's logging: spend that once here, on a throwaway actor created with stderr pointed at
    /dev/null for the one call, so that no capture prints it."""

    @ray.remote(num_cpus=0, max_restarts=1)
    class Throwaway:
        def __init__(self, ref):
            pass

    ref = ray.put(None)
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        actor = Throwaway.remote(ref)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    ray.kill(actor, no_restart=True)


def node_cpus(ray) -> int:
    """CPUs of the largest live node: a task runs on one node, so one sized to the cluster's total (the
    sum over its nodes) fits none and waits forever."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(cpus, default=0) or os.cpu_count() or 1


def in_ray_job() -> bool:
    """True inside a driver started by `ray job submit` (it runs in a temporary copy of the
    working dir, so relative output paths would vanish with it)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def user_error_in(e: BaseException) -> UserError | None:
    """Find a UserError raised inside a Ray actor under Ray's wrappers (RayTaskError,
    UserCodeException); Ray may only keep it as text in the remote traceback."""
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e))
        if m := re.search(r"tourray\.errors\.UserError: (.*?)(?:\n\s*\n|$)", str(e), re.S):
            return UserError(m[1].strip())
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _detached(e: BaseException) -> BaseException:
    """`e` holding no frame: its traceback's lines kept as a note, the traceback and the chained exceptions
    (Ray Data's StopIteration and end-of-stream plumbing) dropped. Clearing the traceback's own frames was
    not enough: an error raised on Ray Data's executor thread reaches, through its frames' callers, the
    executor and its actor handles, and those callers may still be running when this is raised."""
    e.add_note("Raised inside Ray Data at:\n" + "".join(traceback.format_tb(e.__traceback__)).rstrip())
    e.__cause__ = e.__context__ = None
    return e.with_traceback(None)


def pool_batches(ds, on_ray_error: Callable[[BaseException], UserError] | None = None) -> Iterator:
    """A Ray Data pipeline's output blocks, each as soon as it is computed (no prefetch: the consumer
    commits one before the next arrives, so a kill loses one group, not two).

    A failed execution leaves its actor pool in a reference cycle with the error (Ray Data frees actors by
    dropping their handles): until the cyclic collector ran, the pool kept its CPUs, and a later task asking
    for every CPU of the node waited forever. So on failure the iterator is dropped, the collector run, and
    the error raised outside `except`, unchained: a UserError raised inside an actor as itself, Ray's own
    failure as `on_ray_error(e)` when given (its full text goes to the debug log), anything else as it is,
    holding no frame (`_detached`: its lines kept as a note). A consumer that stops early
    (its own error) closes the generator, which closes Ray's iterator.
    """
    it, failed = ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"), None
    try:
        yield from it
    except Exception as e:  # noqa: BLE001 - every failure of the pipeline, sorted below
        if (failed := user_error_in(e)) is None:
            if on_ray_error is not None and type(e).__module__.startswith("ray"):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("Ray Data pipeline failed; Ray's error in full:\n%s", "".join(traceback.format_exception(e)))
                failed = on_ray_error(e)
            else:
                failed = _detached(e)
    if failed is not None:
        ds = it = None  # they hold the error that holds the pool, and this frame outlives the raise
        gc.collect()
        raise failed


@contextlib.contextmanager
def overlapped(items: Iterator, pool, depth: int = 2):
    """Run a generator on `pool` (a one-thread executor kept for the actor's life: a fresh thread
    per group would get a fresh malloc arena, and memory would grow with the corpus), `depth` items
    ahead of its consumer, so that producing (forward passes) overlaps consuming (Lance writes).
    Errors reach the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        put(done)

    def consume():
        while (x := q.get()) is not done:
            if isinstance(x, BaseException):
                raise x
            yield x

    future = pool.submit(produce)
    try:
        yield consume()
    finally:
        stop.set()
        future.result()


@contextlib.contextmanager
def building_folder(out: Path, tag: str) -> Iterator[Path]:
    """A temporary folder beside `out` to build into, renamed to `out` (absent or empty) when the
    block succeeds and removed when it fails: a checkpoint folder appears whole or not at all."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty: callers refuse a non-empty one first
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_lake_placement(lake_root: str, shared: bool) -> None:
    """Refuse a local-folder lake on a Ray cluster of several nodes: actors on other nodes would
    write fragments into their own local disks, where the driver (and later readers) cannot see
    them. A URI lake (s3://, gs://, ...) is fine; so is a folder every node mounts at the same path
    (`shared`, e.g. NFS). Call it on the driver after `init_ray`."""
    import ray

    if shared or "://" in str(lake_root) or not ray.is_initialized():
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        raise UserError(
            f"--lake {lake_root} is a local folder but this Ray cluster has {len(alive)} nodes: actors on other "
            "nodes would write files the driver cannot see. Use an object-store lake (s3://...), or --lake-shared "
            "if every node mounts this folder at the same path")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (two git subprocesses), once per process: statistics rows ask per group."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
