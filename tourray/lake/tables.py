"""The lake: one Lance dataset per table under a root URI, with declared schemas.

Schemas are declared once, in `schemas/<table>.yaml`, and every write is checked against them.
Workers write fragments (`write_fragments`) and hand back their metadata as JSON; only the driver
commits (`commit`), one Lance `Append` per table, so a table only ever grows by whole groups.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import lance
import pyarrow as pa
import yaml
from lance.arrow import BFloat16Type

from tourray.errors import UserError
from tourray.runtime import resolve_uri

log = logging.getLogger("tourray")

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # package data: tourray/lake/schemas/*.yaml
TABLES = ("runs", "run_texts", "samples", "tokens", "activations", "token_layers", "block_sums", "blocks", "layer_stats", "pair_stats",
          "moments", "solves", "leases", "logits", "heal_log", "tours")
RUN_ZONES = "run_zones"  # the name of every table's zone map of `run` (Lake.index_runs)

_SCALARS = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bfloat16": BFloat16Type(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}


def arrow_type(spec: str) -> pa.DataType:
    """Parse the small type language of `schemas/*.yaml` (scalars, list<T>, fixed_size_list<T>[N])."""
    spec = spec.strip()
    if spec in _SCALARS:
        return _SCALARS[spec]
    if m := re.fullmatch(r"list<(.+)>", spec):
        return pa.list_(arrow_type(m[1]))
    if m := re.fullmatch(r"large_list<(.+)>", spec):  # > 2^31 values per column chunk (d x d matrices)
        return pa.large_list(arrow_type(m[1]))
    if m := re.fullmatch(r"fixed_size_list<(.+)>\[(\d+)\]", spec):
        return pa.list_(arrow_type(m[1]), int(m[2]))
    raise ValueError(f"unknown type {spec!r} in a schema declaration")


@lru_cache(maxsize=None)
def _declaration(table: str) -> dict:
    path = SCHEMA_DIR / f"{table}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no schema declaration {path}")
    return yaml.safe_load(path.read_text())


def schema(table: str, **params) -> pa.Schema:
    """The declared Arrow schema of `table`; `params` fill parameters such as {hidden_size}."""
    decl = _declaration(table)
    fields = []
    for col in decl["columns"]:
        try:
            spec = col["type"].format(**params)
        except KeyError as e:
            raise ValueError(f"schema {table}: column {col['name']} needs parameter {e}") from None
        fields.append(pa.field(col["name"], arrow_type(spec), nullable=col.get("nullable", False)))
    meta = {"tourray.table": table, "tourray.schema_version": str(decl["version"])}
    return pa.schema(fields, metadata=meta)


def same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """`DataType.equals` that also compares fixed-size-list widths (pyarrow ignores them when the
    item is an extension type such as bfloat16)."""
    if pa.types.is_fixed_size_list(a) or pa.types.is_fixed_size_list(b):
        return (pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b)
                and a.list_size == b.list_size and same_type(a.value_type, b.value_type))
    return a.equals(b)


def check(table: str, data: pa.Table | pa.RecordBatch, expected: pa.Schema) -> None:
    """Refuse data that does not match the declared schema, naming table and column."""
    got = {f.name: f for f in data.schema}
    problems = []
    for f in expected:
        g = got.pop(f.name, None)
        if g is None:
            problems.append(f"missing column {f.name!r}")
        elif not same_type(g.type, f.type):
            problems.append(f"column {f.name!r} is {g.type}, schema says {f.type}")
        elif not f.nullable and data.column(f.name).null_count:
            problems.append(f"column {f.name!r} has nulls but is not nullable")
    problems += [f"unexpected column {name!r}" for name in got]
    if problems:
        raise UserError(f"write to table {table!r} refused: " + "; ".join(problems))


class Lake:
    """A lake root (local path or URI) and its tables.

    >>> lake = Lake("lake/")             # doctest: +SKIP
    >>> lake.dataset("tokens").count_rows()  # doctest: +SKIP
    """

    def __init__(self, root: str, storage_options: dict[str, str] | None = None):
        self.root = resolve_uri(root)
        # Lance wants a str -> str mapping (YAML gives bools and numbers); {} means "the environment".
        self.storage_options = ({str(k): str(v).lower() if isinstance(v, bool) else str(v)
                                 for k, v in storage_options.items()} or None) if storage_options else None

    def __repr__(self) -> str:
        return f"Lake({self.root!r})"

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}.lance"

    def filesystem(self, table: str):
        """(pyarrow FileSystem, path) of `table`'s folder, with this lake's credentials: for listing
        files Lance does not track (never-committed fragments). s3:// maps Lance's storage_options
        onto pyarrow's S3 options; without them (or for other stores) the environment is used."""
        import pyarrow.fs as pafs

        so, uri = {k.lower(): v for k, v in (self.storage_options or {}).items()}, self.uri(table)
        if not uri.startswith("s3://") or not so:
            return pafs.FileSystem.from_uri(uri)
        pick = lambda *names: next((so[n] for n in names if n in so), None)  # noqa: E731
        kw = dict(access_key=pick("aws_access_key_id", "access_key_id"),
                  secret_key=pick("aws_secret_access_key", "secret_access_key"),
                  session_token=pick("aws_session_token", "session_token"), region=pick("aws_region", "region"),
                  endpoint_override=pick("aws_endpoint", "endpoint", "aws_endpoint_url"))
        if pick("allow_http", "aws_allow_http") == "true":
            kw["scheme"] = "http"
        return pafs.S3FileSystem(**{k: v for k, v in kw.items() if v is not None}), uri.removeprefix("s3://")

    def exists(self, table: str) -> bool:
        return self._open(table) is not None

    def _open(self, table: str) -> lance.LanceDataset | None:
        """The table's dataset, or None when it has not been created yet."""
        try:
            return self.dataset(table)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:
            msg = str(e)
            if "was not found" in msg and "LanceError(IO)" not in msg:  # no such dataset (yet)
                return None
            # an object-store failure (unreachable endpoint, no bucket, bad credentials) is not "missing"
            msg = " ".join(re.sub(r",\s*/\S+\.rs:\d+:\d+", "", msg).split())[:600]
            raise UserError(f"lake {self.root}: cannot read {self.uri(table)} from its store: {msg}") from None

    def dataset(self, table: str, version: int | None = None) -> lance.LanceDataset:
        return lance.dataset(self.uri(table), version=version, storage_options=self.storage_options)

    def tables(self) -> list[str]:
        return [t for t in TABLES if self.exists(t)]

    def ensure(self, table: str, expected: pa.Schema) -> None:
        """Create `table` empty with `expected` schema, or check the existing one matches it."""
        if not self.exists(table):
            try:
                lance.write_dataset(
                    empty_table(expected), self.uri(table), schema=expected, mode="create",
                    storage_options=self.storage_options,
                )
                log.info("lake: created %s", self.uri(table))
                return
            except Exception:  # noqa: BLE001 - a concurrent driver created it first: check its schema
                if not self.exists(table):
                    raise
        have = self.dataset(table).schema
        diffs = [
            f"{f.name}: lake has {have.field(f.name).type if f.name in have.names else 'nothing'}, "
            f"this capture writes {f.type}"
            for f in expected
            if f.name not in have.names or not same_type(have.field(f.name).type, f.type)
        ]
        old_v = (have.metadata or {}).get(b"tourray.schema_version", b"1").decode()
        new_v = (expected.metadata or {}).get(b"tourray.schema_version", b"1").decode()
        if diffs and old_v != new_v:
            raise UserError(
                f"table {self.uri(table)} was written by an older tourray (schema version {old_v}, this one writes "
                f"version {new_v}: {'; '.join(diffs)}); use a new --lake, or delete that lake to recapture it"
            )
        if diffs:
            raise UserError(
                f"table {self.uri(table)} does not match this capture ({'; '.join(diffs)}). One lake "
                "holds one hidden size and store dtype: use another --lake for this model or dtype."
            )

    def lease(self, kind: str = "writer", run: str | None = None, ttl_s: float | None = None) -> "Lease":
        """A lease for a writer of this lake, held for the writer's whole life (returned not yet
        acquired: `with lake.lease("heal", run=name): ...`). `run`: exclusive on that run; None: a
        lake-wide lease, shared. Call its `check()` right before each commit. See `Lease`."""
        return Lease(self, kind, run, ttl_s)

    # -- workers ---------------------------------------------------------------------------
    def write_fragments(
        self, table: str, data: pa.RecordBatchReader | pa.Table, expected: pa.Schema
    ) -> list[str]:
        """Write data files for `table` without committing; return fragment metadata as JSON.

        Every batch is checked against `expected` as it streams through.
        """
        batches = data.to_batches() if isinstance(data, pa.Table) else data

        raised: list[BaseException] = []

        def checked() -> Iterable[pa.RecordBatch]:
            try:
                for b in batches:
                    check(table, b, expected)
                    yield b
            except BaseException as e:  # Lance would wrap it in an opaque OSError: keep the original
                raised.append(e)
                raise

        reader = pa.RecordBatchReader.from_batches(expected, checked())
        try:
            frags = lance.fragment.write_fragments(
                reader, self.uri(table), schema=expected, storage_options=self.storage_options
            )
        except Exception:
            if raised:
                raise raised[0] from None
            raise
        return [json.dumps(f.to_json()) for f in frags]

    # -- driver ----------------------------------------------------------------------------
    def commit(self, table: str, fragments: list[str]) -> int | None:
        """Append written fragments to `table` in one atomic Lance commit; return the new version
        (None when there was nothing to commit)."""
        if not fragments:
            return None
        metas = [lance.fragment.FragmentMetadata.from_json(f) for f in fragments]
        ds = lance.LanceDataset.commit(
            self.uri(table),
            lance.LanceOperation.Append(metas),
            read_version=self.dataset(table).version,
            storage_options=self.storage_options,
        )
        return ds.version

    def append(self, table: str, data: pa.Table, expected: pa.Schema) -> int:
        """Write and commit a small table from the driver."""
        return self.commit(table, self.write_fragments(table, data, expected))

    def index_runs(self, tables: Iterable[str]) -> list[str]:
        """Bring each table's zone map of `run` (Lance's ZONEMAP index: the min and max `run` of every
        8,192 rows) up to date, reading only the fragments it does not cover yet. A query for one run
        then skips the other runs' zones instead of decoding every row's `run` string (two runs in a
        lake: `layer_similarity.sql` 1.6x faster). Fragments appended later are scanned as before until
        the next call (the capture driver's end of run, `tourray optimize`); answers never depend on it.
        Returns the tables whose index changed."""
        def refresh(table: str) -> bool:  # opened afresh on each try: a retry rebases on the winner
            ds = self._open(table)
            if ds is None or "run" not in ds.schema.names or not ds.count_rows():
                return False
            if not any(i["name"] == RUN_ZONES for i in ds.list_indices()):
                ds.create_scalar_index("run", "ZONEMAP", name=RUN_ZONES, replace=True)
            elif ds.stats.index_stats(RUN_ZONES)["num_unindexed_fragments"]:
                ds.optimize.optimize_indices(index_names=[RUN_ZONES])
            else:
                return False
            return True

        return [t for t in tables if _retrying(lambda: refresh(t), tries=4)]

    def delete(self, table: str, predicate: str) -> None:
        if (ds := self._open(table)) is not None:
            ds.delete(predicate)

    def read(self, table: str, columns: list[str] | None = None, filter: str | None = None,
             after_fragment: int | None = None) -> pa.Table:
        """`after_fragment`: read only fragments with a larger id. Lance numbers fragments in commit
        order (compaction writes new ones), so "what was committed since id N" costs what is new."""
        if (ds := self._open(table)) is None:
            return schema_or_empty(table, columns)
        if after_fragment is None:
            return ds.to_table(columns=columns, filter=filter)
        frags = [f for f in ds.get_fragments() if f.fragment_id > after_fragment]
        return ds.scanner(columns=columns, filter=filter, fragments=frags).to_table()

    def last_fragment(self, table: str) -> int:
        """Id of the newest fragment of `table` (-1 when it has none): a watermark for `read`."""
        ds = self._open(table)
        return max((f.fragment_id for f in ds.get_fragments()), default=-1) if ds is not None else -1

    def scan(self, table: str, columns: list[str] | None = None, filter: str | None = None,
             batch_rows: int = 4096, dataset: lance.LanceDataset | None = None) -> Iterable[pa.RecordBatch]:
        """Stream `table` in physical order, `batch_rows` rows at a time (memory: one batch).

        Filters and projections run inside Lance, so a scan of one layer reads only its bytes.
        Pass `dataset` to read a pinned version (what a statistic records as its source)."""
        ds = dataset if dataset is not None else self._open(table)
        if ds is None:
            return iter(())
        return ds.scanner(columns=columns, filter=filter, batch_size=batch_rows, scan_in_order=True).to_batches()


def schema_or_empty(table: str, columns: list[str] | None) -> pa.Table:
    """An empty table for a table that does not exist yet (so readers need no special case)."""
    params = {"store_dtype": "float32", "hidden_size": 1}
    s = schema(table, **params)
    if columns:
        s = pa.schema([s.field(c) for c in columns])
    return empty_table(s)


def empty_table(s: pa.Schema) -> pa.Table:
    """`Schema.empty_table` that also handles extension types (bfloat16) inside lists."""

    def empty(t: pa.DataType) -> pa.Array:
        if isinstance(t, pa.ExtensionType):
            return pa.ExtensionArray.from_storage(t, empty(t.storage_type))
        if pa.types.is_fixed_size_list(t):
            return pa.FixedSizeListArray.from_arrays(empty(t.value_type), t.list_size)
        return pa.array([], t)

    return pa.Table.from_arrays([empty(f.type) for f in s], schema=s)


def sql_quote(value: str) -> str:
    """Quote a string literal for a Lance / DuckDB filter."""
    return "'" + str(value).replace("'", "''") + "'"


def run_row(lake: "Lake", run: str, flag: str = "--run") -> dict:
    """The run's `runs` row, or the one error that names the runs there are (`flag` is the option at fault)."""
    if not lake.exists("runs"):
        raise UserError(f"{flag}: no tourray tables under {lake.root}")
    rows = lake.read("runs", filter=f"run = {sql_quote(run)}").to_pylist()
    if not rows:
        known = ", ".join(sorted(lake.read("runs", ["run"]).column(0).to_pylist())) or "none"
        raise UserError(f"{flag}: no run {run!r} in {lake.root} (runs: {known})")
    return rows[0]


# -- vectors ---------------------------------------------------------------------------------
def vectors_to_arrow(h, store_dtype: str) -> pa.FixedSizeListArray:
    """[n, d] numpy array, already in `store_dtype` -> FixedSizeList column for `h`.

    numpy has no bfloat16: pass its raw bit patterns as uint16 (stored as Lance's BFloat16 type)."""
    import numpy as np

    n, d = h.shape
    if store_dtype == "bfloat16":
        raw = np.ascontiguousarray(h).view(np.uint16).reshape(-1)
        storage = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), n * d, [None, pa.py_buffer(raw)])
        values = pa.ExtensionArray.from_storage(BFloat16Type(), storage)
    else:
        values = pa.array(np.ascontiguousarray(h).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, d)


def arrow_to_numpy(col: pa.FixedSizeListArray | pa.ChunkedArray, dtype=None):
    """FixedSizeList column -> [n, d] numpy array.

    `dtype=None` keeps the stored bits (float16, float32, or bfloat16 as its uint16 patterns: the
    bytes checksums are taken of); a dtype such as float32 converts the values."""
    import numpy as np

    if isinstance(col, pa.ChunkedArray):
        parts = [arrow_to_numpy(c, dtype) for c in col.chunks]
        return np.concatenate(parts) if parts else np.empty((0, col.type.list_size), dtype or np.float32)
    d = col.type.list_size
    values = col.values.slice(col.offset * d, len(col) * d)
    if isinstance(values.type, BFloat16Type):
        st = values.storage
        out = np.frombuffer(st.buffers()[1], dtype=np.uint16, count=len(st), offset=st.offset * 2)
        if dtype is not None:
            out = (out.astype(np.uint32) << 16).view(np.float32)
    else:
        out = values.to_numpy(zero_copy_only=False)
    out = out.reshape(len(col), d)
    return out.astype(dtype, copy=False) if dtype is not None else out


# -- leases ----------------------------------------------------------------------------------
#: Seconds without a heartbeat after which a lease is stale (its holder crashed or stalled): long
#: enough for a slow object store, short enough that a killed capture can be resumed soon.
LEASE_TTL_S = float(os.environ.get("TOURRAY_LEASE_TTL_S", "120"))

#: Seconds by which the clocks of two hosts (or a host and its object store, which stamps files, s3 to
#: the second) may disagree: an unreferenced file is removed only when it is this much older than
#: another writer's lease (`removable_before`).
CLOCK_SKEW_S = float(os.environ.get("TOURRAY_CLOCK_SKEW_S", "5"))

#: What holds leases today; a new writer names itself (any lowercase word) and uses `Lake.lease`.
LEASE_KINDS = ("capture", "optimize", "repair", "writer")

_BUSY = {"capture": "captured by another driver", "repair": "repaired by tourray repair",
         "optimize": "optimized by tourray optimize"}

_HOST: tuple[str | None, int | None] | None = None


def host_identity() -> tuple[str | None, int | None]:
    """(boot id, PID-namespace inode) of this process: two processes see each other's pids only when
    both match (a hostname does not tell: containers with host networking and Kubernetes pods with
    hostNetwork share one across PID namespaces). (None, None) without /proc: leases then end only
    by expiry."""
    global _HOST
    if _HOST is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
        except OSError:
            boot = None
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino or None
        except OSError:
            ns = None
        _HOST = (boot, ns)
    return _HOST


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ts(t: dt.datetime) -> str:
    """A timestamp literal for a Lance filter or update."""
    return f"CAST({sql_quote(t.astimezone(dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S.%f'))} AS TIMESTAMP)"


class LeaseLost(UserError):
    """This process's lease went stale or was taken over: it must not commit (see `Lease.check`)."""


class Lease:
    """A writer's claim on the lake, kept as a row of the Lance table `leases` for the writer's whole
    life and refreshed from a heartbeat thread. Every process that writes files before it commits them
    (captures, `tourray optimize`, `tourray repair`, and any new writer) holds one, so that

    * an unreferenced data file is removed (by repair, a resuming capture, optimize
      --delete-unverified) only when it is older than the oldest live lease (`removable_before`):
      a live writer's not-yet-committed files are always younger than its lease;
    * a lease on a `run` is exclusive: one holder per run, whatever its kind. A lake-wide lease
      (`run=None`: optimize, repair) is shared;
    * a holder that stalled past its expiry, or was taken over, is refused at its next commit
      (`check`, the fence).

    Exclusive leases: Lance commits are atomic and ordered on a local folder and on s3:// alike, so
    "append a `pending` row, then the earliest-committed live row wins" needs no conditional put. The
    loser deletes its row and is refused; the winner marks its row `held` (so later askers see it
    whatever its position). A holder is judged gone before its expiry only when it ran in this PID
    namespace of this boot (`host_identity`) and its pid is gone.

    >>> with lake.lease("heal", run="demo-heal"):  # doctest: +SKIP
    ...     lake.append(...)
    """

    def __init__(self, lake: Lake, kind: str = "writer", run: str | None = None, ttl_s: float | None = None):
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", kind or ""):
            raise ValueError(f"lease kind {kind!r}: a lowercase word such as {', '.join(LEASE_KINDS)}")
        self.lake, self.kind, self.run = lake, kind, run
        self.ttl_s = LEASE_TTL_S if ttl_s is None else float(ttl_s)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started: dt.datetime | None = None  # set by acquire: the bound for other removers
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._expires: dt.datetime | None = None

    def __repr__(self) -> str:
        return f"Lease({self.kind}, run={self.run!r}, holder={self.holder!r})"

    @property
    def exclusive(self) -> bool:
        return self.run is not None

    def _scope(self) -> str:
        return f"run = {sql_quote(self.run)}" if self.exclusive else "run IS NULL"

    def _mine(self) -> str:
        return f"holder = {sql_quote(self.holder)}"

    def _row(self, state: str) -> pa.Table:
        boot, ns = host_identity()
        now = self.started = _now()
        self._expires = now + dt.timedelta(seconds=self.ttl_s)
        row = dict(run=self.run, holder=self.holder, kind=self.kind, state=state, host=socket.gethostname(),
                   pid=os.getpid(), boot_id=boot, pid_ns=ns, started=now, heartbeat=now, expires=self._expires)
        return pa.Table.from_pylist([row], schema=schema("leases"))

    def live(self) -> list[dict]:
        """Rows of this lease's scope (its run, or the lake-wide leases) that still hold, in commit order."""
        ds = self.lake._open("leases")
        if ds is None:
            return []
        t = ds.to_table(filter=self._scope(), with_row_address=True).to_pylist()
        now = _now()
        return sorted((r for r in t if holds(r, now)), key=lambda r: r["_rowaddr"])

    def acquire(self) -> "Lease":
        sch = schema("leases")
        ensure_leases(self.lake)
        self.lake.append("leases", self._row("pending" if self.exclusive else "held"), sch)
        if self.exclusive:
            live = self.live()
            others_held = [r for r in live if r["state"] == "held" and r["holder"] != self.holder]
            first = next((r for r in live if r["state"] == "pending"), None)
            if others_held or first is None or first["holder"] != self.holder:
                _retrying(lambda: self.lake.delete("leases", self._mine()))
                other = (others_held or [r for r in live if r["holder"] != self.holder])[0]
                what = _BUSY.get(other.get("kind") or "capture", f"written by another {other.get('kind')}")
                raise UserError(f"run {self.run!r} in {self.lake.root} is being {what} ({other['holder']}, "
                                f"alive until {other['expires']:%H:%M:%S} UTC); wait for it, or use another --run. A "
                                f"crashed holder's lease goes stale {self.ttl_s:.0f} s after its last heartbeat")
            # one atomic commit turns our row into `held` (never a moment without it)
            _retrying(lambda: self.lake.dataset("leases").update({"state": "'held'"}, where=self._mine()))
        # stale rows of any holder go (a row that expired never holds again: see `beat`)
        _retrying(lambda: self.lake.delete("leases", f"holder != {sql_quote(self.holder)} AND expires < {_ts(_now())}"))
        self._thread = threading.Thread(target=self._beat_loop, name=f"lease-{self.kind}-{self.run or 'lake'}",
                                        daemon=True)
        self._thread.start()
        return self

    def beat(self) -> bool:
        """Refresh this lease's expiry, but only while it has not expired: a holder that stalled past
        its expiry never revives its row (another may have judged it stale and taken over meanwhile).
        False (and `lost`) when there was no unexpired row to refresh."""
        if self.lost:
            return False
        now = _now()
        exp = now + dt.timedelta(seconds=self.ttl_s)
        res = _retrying(lambda: self.lake.dataset("leases").update(
            {"heartbeat": _ts(now), "expires": _ts(exp)}, where=f"{self._mine()} AND expires > {_ts(now)}"))
        if not (res or {}).get("num_rows_updated", 1):
            self.lost = True
            log.error("%s lease%s lost (it went stale; another process may have taken over)", self.kind,
                      f" on run {self.run}" if self.run else "")
            return False
        self._expires = exp
        return True

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self.lost:
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; expiry is the safety net
                log.warning("lease heartbeat (%s%s) failed: %s", self.kind, f", run {self.run}" if self.run else "", e)

    def _lose(self, why: str) -> None:
        self.lost = True
        what = f"run {self.run!r}" if self.run else f"the lake {self.lake.root}"
        raise LeaseLost(f"{what}: this {self.kind}'s lease {why}; stopping before it commits anything more")

    def check(self) -> None:
        """The fence: call it right before each commit. Raises `LeaseLost` unless this lease's row is
        still in the table, `held`, unexpired with at least half its lifetime left (refreshed here if
        the heartbeat fell behind), and no other live holder of the run took over after it. So a
        commit made right after a `check` lands within this lease's lifetime: no other process can
        have judged it stale and deleted this writer's files or rows (commits take far less than
        TTL/2; the hosts' clocks agree to well within it)."""
        if self.lost:
            self._lose("went stale and may have been taken over")
        ds = self.lake._open("leases")
        rows = ds.to_table(filter=self._scope() if self.exclusive else self._mine()).to_pylist() if ds is not None else []
        now = _now()
        mine = next((r for r in rows if r["holder"] == self.holder), None)
        if mine is None:
            self._lose("is gone from the leases table (it went stale and another process removed it)")
        if mine["state"] != "held" or mine["expires"] <= now:
            self._lose(f"expired at {mine['expires']:%H:%M:%S} UTC (a stall longer than its {self.ttl_s:.0f} s lifetime)")
        newer = [r for r in rows if r["holder"] != self.holder and r["state"] == "held" and holds(r, now)
                 and (r.get("started") or now) >= (mine.get("started") or now)]
        if newer:
            self._lose(f"was taken over by {newer[0]['holder']}")
        if (mine["expires"] - now).total_seconds() < self.ttl_s / 2 and not self.beat():
            self._lose("expired before its heartbeat could refresh it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            _retrying(lambda: self.lake.delete("leases", self._mine()))
        except Exception as e:  # noqa: BLE001 - the row then goes stale by itself
            log.warning("could not release %s lease%s: %s", self.kind, f" on run {self.run}" if self.run else "", e)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunLease(Lease):
    """A capture driver's exclusive lease on its run: `Lease` of kind "capture" (see there)."""

    def __init__(self, lake: Lake, run: str, ttl_s: float | None = None, kind: str = "capture"):
        super().__init__(lake, kind, run, ttl_s)


def ensure_leases(lake: Lake) -> None:
    """Create the `leases` table, or bring one written by an older tourray (schema version 1, no
    kinds, hosts or start times) to this schema when none of its rows is live."""
    sch = schema("leases")
    ds = lake._open("leases")
    if ds is not None and not set(sch.names) <= set(ds.schema.names):
        now = _now()
        if live := [r for r in ds.to_table().to_pylist() if r["expires"] > now]:
            raise UserError(f"lake {lake.root}: a capture by an older tourray holds run {live[0].get('run')!r} "
                            f"({live[0].get('holder')}) until {live[0]['expires']:%H:%M:%S} UTC; let it finish")
        lance.write_dataset(empty_table(sch), lake.uri("leases"), schema=sch, mode="overwrite",
                            storage_options=lake.storage_options)
        log.info("lake: %s upgraded to schema version %s", lake.uri("leases"), _declaration("leases")["version"])
    try:
        lake.ensure("leases", sch)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - another process created it in the meantime
        if not lake.exists("leases"):
            raise


def live_leases(lake: Lake) -> list[dict]:
    """Lease rows of every kind that still hold: writers that may have files in flight."""
    if (ds := lake._open("leases")) is None:
        return []
    now = _now()
    return [r for r in ds.to_table().to_pylist() if holds(r, now)]


def removable_before(lake: Lake, own: Iterable[str] = ()) -> dt.datetime | None:
    """The instant before which an unreferenced data file cannot be a live writer's not-yet-committed
    file: the start of the oldest live lease, less `CLOCK_SKEW_S` for other holders (`own`: holder ids
    of the caller's leases, whose start is on its own clock). None when no lease is live. Read it
    after listing the files and before reading what versions reference: a writer whose file was
    listed either still holds its lease then, or has committed that file, or never will."""
    own, starts = set(own), []
    for r in live_leases(lake):
        start = r.get("started") or dt.datetime.min.replace(tzinfo=dt.timezone.utc)  # older rows: unknown
        starts.append(start if r["holder"] in own else start - dt.timedelta(seconds=CLOCK_SKEW_S))
    return min(starts, default=None)


def _retrying(fn, tries: int = 8):
    """Run a mutation of the small `leases` table again when a concurrent holder's commit conflicts
    with it (Lance rebases appends, not deletes/updates racing each other)."""
    for i in range(tries):
        try:
            return fn()
        except (OSError, RuntimeError, ValueError) as e:  # how Lance reports a commit conflict varies
            if "onflict" not in str(e) or i == tries - 1:
                raise
            time.sleep(0.05 * (i + 1))


def holds(row: dict, now: dt.datetime) -> bool:
    """A lease row holds until it expires, or until its holder's process is seen to be gone: only
    when it ran in this boot and this PID namespace (`host_identity`; a killed driver on this machine:
    resuming need not wait for the expiry). Anywhere else a pid means nothing here."""
    if row["expires"] <= now:
        return False
    boot, ns = host_identity()
    pid = row.get("pid")
    if boot is None or ns is None or row.get("boot_id") != boot or row.get("pid_ns") != ns or not pid:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
