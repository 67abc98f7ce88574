#!/usr/bin/env python
"""Capture benchmark: tourray's Ray + Lance capture against a plain forward and against the
per-sample .pt files it replaces, the layer-similarity query on both, and capture peak memory.

Everything runs in one invocation, so all ratios compare figures taken under the same machine
load (other work may share the cores: compare ratios, not absolute figures, across runs).

    (a) plain transformers forward (no hooks, no storage)           tokens/s
    (b) tourray run_capture, layers=all, float16, into a fresh lake  tokens/s (3 ways, see below)
    (c) forward hooks + one torch.save .pt per sample + metadata.jsonl
    query: mean cosine between layers l-1 and l: (b) SQL on the lake, (c) .pt + torch, over the text
           tokens (tourray/lake/queries/layer_similarity.sql on block_sums, and its former forms on
           token_layers) and over all tokens (token_layers, and the self-join of activations it replaced)
    memory: peak RSS of the capture actor and the driver at 1x and 4x the samples (fresh processes)

(b) is reported as
    * summary   - run_capture's tokens / capture_seconds (includes the actor's start and model load);
    * steady    - tokens of groups 2..G / time from the end of group 1 to the end of group G, as the
                  actor wrote them (newest mtime of each group's `samples` data files, found by
                  wrapping Lake.commit in this process): excludes Ray start-up, the actor start, model
                  load and group 1. The same window from the driver's commit times is reported too,
                  but Ray Data hands the driver each group one group late (iter_rows prefetches one
                  block), which biases it;
    * wall      - tokens / the whole run_capture call (plan + Ray start + everything).

The model is a synthetic Qwen3 built from a config (sizes below), or with --model an existing checkpoint
folder: SmolLM2-135M-Instruct as `make demo` imports it, .cache/smollm2-135m-instruct.

Usage:  .venv/bin/python bench/bench_capture.py            # full size (~210 samples, ~50k tokens)
        .venv/bin/python bench/bench_capture.py --quick    # smoke size (16 samples)
        .venv/bin/python bench/bench_capture.py --model .cache/smollm2-135m-instruct -n 36  # SmolLM2, ~15k tokens
        .venv/bin/python bench/bench_capture.py --query-only  # the query figures again, on a previous run's data
Writes <out>/results.json and prints a table; bulk data (model, lakes, .pt files) stays under <out>.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)  # always an embedded Ray of our own, never a `ray start` cluster

# All-token figures: the same mean cosine from token_layers' scalars, and the self-join of the
# vectors that it replaced (tourray/lake/queries/layer_similarity.sql before token_layers existed).
ALL_TOKENS_SQL = """
SELECT layer, count(*) AS tokens, avg(cos_prev) AS mean_cos
FROM token_layers WHERE run = $run AND site = 'resid_post' AND cos_prev IS NOT NULL
GROUP BY layer
ORDER BY layer
"""
# The shipped layer_similarity.sql of 2026-12-01 (3.98x): the token_layers view (itself a semi join
# with samples) joined to samples again on (run, sample_id), and the clamp on the FLOAT column.
LAYER_SIMILARITY_BEFORE_SQL = """
SELECT t.layer, count(*) AS tokens, avg(t.cos_prev) AS mean_cos, 1 - avg(t.cos_prev) AS block_influence,
       avg(acos(least(greatest(t.cos_prev, -1), 1)) / pi()) AS angular_distance
FROM token_layers AS t
JOIN samples AS s ON s.run = t.run AND s.sample_id = t.sample_id
WHERE t.run = $run AND s.run = $run AND t.site = 'resid_post' AND t.cos_prev IS NOT NULL
  AND t.pos >= s.text_start AND t.pos < s.text_end
GROUP BY t.layer
ORDER BY t.layer
"""
# The shipped layer_similarity.sql of 2026-12-05 (5.87x): every text-token row of raw_token_layers,
# joined once to the run's samples for the text span (before the per-block sums of block_sums).
LAYER_SIMILARITY_TOKEN_ROWS_SQL = """
SELECT t.layer, count(*) AS tokens, avg(t.cos_prev) AS mean_cos, 1 - avg(t.cos_prev) AS block_influence,
       avg(acos(least(greatest(t.cos_prev::DOUBLE, -1.0), 1.0)) / pi()) AS angular_distance
FROM raw_token_layers AS t
JOIN (SELECT sample_id, text_start, text_end FROM samples WHERE run = $run) AS s ON s.sample_id = t.sample_id
WHERE t.run = $run AND t.site = 'resid_post' AND t.cos_prev IS NOT NULL
  AND t.pos >= s.text_start AND t.pos < s.text_end
GROUP BY t.layer
ORDER BY t.layer
"""
LAYER_PAIR_SQL = """
WITH a AS (
    SELECT sample_id, pos, layer, h FROM activations WHERE run = $run AND site = 'resid_post'
)
SELECT o.layer AS layer, count(*) AS tokens, avg(array_cosine_similarity(i.h, o.h)) AS mean_cos
FROM a AS o
JOIN a AS i ON i.sample_id = o.sample_id AND i.pos = o.pos AND i.layer = o.layer - 1
GROUP BY o.layer
ORDER BY o.layer
"""

# Profiling aids (not targets): the self-join's scan through DuckDB without the join, and the same
# computation straight from Lance with numpy.
SCAN_SQL = "SELECT layer, count(*) AS n, sum(h[1]) AS s FROM activations WHERE run = $run GROUP BY layer"

BULK = ("model", "samples", "samples_4x", "lake", "lake_mem_1x", "lake_mem_4x", "pt_baseline")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# -- setup -----------------------------------------------------------------------------------------
def copy_samples(src: Path, n: int | None, dest: Path, repeat: int = 1) -> list[Path]:
    files = sorted(src.glob("*.txt"))[: n or None]
    dest.mkdir(parents=True)
    out = []
    for r in range(repeat):
        for f in files:
            name = f.name if repeat == 1 else f"r{r}__{f.name}"
            shutil.copyfile(f, dest / name)
            out.append(dest / name)
    return out


def build_model(out: Path, train_texts: list[str], args) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tourray.model.demo import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(train_texts, args.vocab_size)
    torch.manual_seed(args.seed)
    heads = args.hidden_size // args.head_dim
    mc = Qwen3Config(
        vocab_size=len(tok), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        rope_theta=10000.0,
    )
    model = Qwen3ForCausalLM(mc)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(path=str(out), params=n_params, vocab_size=len(tok), hidden_size=args.hidden_size,
                layers=args.layers, heads=heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                intermediate_size=args.intermediate_size, seed=args.seed, build_seconds=round(time.perf_counter() - t0, 2))


def describe_model(model_dir: Path) -> dict:
    """An existing checkpoint's shape, from its config.json (--model)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    return dict(path=str(model_dir), model_type=cfg.get("model_type"), layers=cfg["num_hidden_layers"],
                hidden_size=cfg["hidden_size"], intermediate_size=cfg.get("intermediate_size"), vocab_size=cfg["vocab_size"])


def encode_batches(model_dir: Path, sample_dir: Path, system_prompt: Path, batch_size: int, group_size: int,
                   max_length: int = 2048):
    """The capture's exact inputs: same samples order, PromptFormat, groups, in-group length sort,
    batches and right padding (zeros, attention mask 0) as tourray.capture."""
    from transformers import AutoTokenizer

    import numpy as np

    from tourray.corpus import texts as corpus
    from tourray.model.prompt import SEGMENTS, PromptFormat, right_padded

    tok = AutoTokenizer.from_pretrained(model_dir)
    fmt = PromptFormat(tok, corpus.read_system_prompt(system_prompt))
    samples, _ = corpus.load_samples(sample_dir)
    encoded = [fmt.encode(s.text, max_length) for s in samples]
    enc = [e.input_ids for e in encoded]
    text = [np.flatnonzero(e.segment == SEGMENTS.index("text")) for e in encoded]
    spans = [(int(t[0]), int(t[-1]) + 1) if len(t) else (len(e), len(e)) for t, e in zip(text, enc)]
    batches = []
    for g in range(0, len(samples), group_size):
        members = list(range(g, min(g + group_size, len(samples))))
        order = sorted(members, key=lambda i: -len(enc[i]))
        for a in range(0, len(order), batch_size):
            idx = order[a : a + batch_size]
            n = [len(enc[i]) for i in idx]
            ids, mask = right_padded([enc[i] for i in idx])
            batches.append(dict(ids=ids, mask=mask, n=n, sample_ids=[samples[i].sample_id for i in idx],
                                text_spans=[spans[i] for i in idx]))
    return batches, sum(len(e) for e in enc)


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# -- (a) plain forward -----------------------------------------------------------------------------
def rate(tokens: int, wall: float, cpu: float, **extra) -> dict:
    """tokens/s of wall time, and tokens per CPU-second (a contention-robust cross-check: the CPU
    time of the process doing the work; cpu_util = CPU-s per wall-s, 2.0 = both cores)."""
    return dict(tokens=tokens, seconds=round(wall, 3), tokens_per_s=round(tokens / wall, 1), cpu_seconds=round(cpu, 3),
                tokens_per_cpu_s=round(tokens / cpu, 1) if cpu else None, cpu_util=round(cpu / wall, 2), load1=load1(),
                **extra)


def bench_plain(model, batches, tokens: int) -> dict:
    import torch

    with torch.inference_mode():
        model(input_ids=batches[0]["ids"], attention_mask=batches[0]["mask"], use_cache=False)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False).logits
        s, c = time.perf_counter() - t0, time.process_time() - c0
    return rate(tokens, s, c)


# -- (c) hooks + .pt per sample --------------------------------------------------------------------
def bench_pt(model, batches, tokens: int, out: Path) -> dict:
    import torch

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    buf = {}
    blocks = model.model.layers

    def keeper(layer):
        def hook(mod, args, output):
            buf[layer] = (output[0] if isinstance(output, tuple) else output).detach().to(torch.float16)
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keeper(-1))]
    handles += [blk.register_forward_hook(keeper(i)) for i, blk in enumerate(blocks)]
    try:
        with torch.inference_mode():
            b = batches[0]
            model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False)  # warm-up (no files)
            t0, c0 = time.perf_counter(), time.process_time()
            with open(out / "metadata.jsonl", "w") as meta:
                for b in batches:
                    buf.clear()
                    model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False)
                    for i, (sid, n, (a, z)) in enumerate(zip(b["sample_ids"], b["n"], b["text_spans"])):
                        # clone: saving a view would write the whole padded batch storage
                        d = {layer: t[i, :n].clone() for layer, t in sorted(buf.items())}
                        path = out / f"{sid}.pt"
                        torch.save(d, path)
                        meta.write(json.dumps(dict(sample_id=sid, n_tokens=n, text_start=a, text_end=z, path=str(path))) + "\n")
            s, c = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for h in handles:
            h.remove()
    size = sum(p.stat().st_size for p in out.glob("*.pt"))
    return rate(tokens, s, c, bytes_on_disk=size, files=len(list(out.glob("*.pt"))))


def query_pt(out: Path, num_layers: int, text_only: bool, threads: int | None = None) -> tuple[dict, float]:
    """The seeds' way: load every sample's .pt, cosine of layers l-1 and l per token (over the text
    span recorded in metadata.jsonl when `text_only`); `threads`: torch threads meanwhile."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    t0 = time.perf_counter()
    sums = torch.zeros(num_layers, dtype=torch.float64)
    counts = torch.zeros(num_layers, dtype=torch.long)
    with open(out / "metadata.jsonl") as meta:
        for line in meta:
            m = json.loads(line)
            d = torch.load(m["path"])
            span = slice(m["text_start"], m["text_end"]) if text_only else slice(None)
            for layer in range(num_layers):
                cos = torch.nn.functional.cosine_similarity(d[layer - 1][span].float(), d[layer][span].float(), dim=-1)
                sums[layer] += cos.double().sum()
                counts[layer] += cos.numel()
    s = time.perf_counter() - t0
    torch.set_num_threads(before)
    return {layer: dict(tokens=int(counts[layer]), mean_cos=float(sums[layer] / counts[layer])) for layer in range(num_layers)}, s


# -- (b) tourray capture ---------------------------------------------------------------------------
class CommitTimer:
    """Wrap Lake.commit (driver side, this process) and record, for each group: when the driver
    committed it, when the actor finished writing it (the newest mtime of the data files of its
    `samples` fragments: the actor writes that table last in a group), and the CPU time so far of
    the capture actor and of this process tree (Ray included) at the commit."""

    def __init__(self):
        from tourray.lake import tables as lk

        self.lk, self.orig, self.groups, self._tokens = lk, lk.Lake.commit, [], 0
        self.psutil = _psutil()
        self.me = self.psutil.Process(os.getpid())
        self.actor = None

    def _cpu(self) -> tuple[float | None, float]:
        ps = self.psutil
        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except ps.Error:
            pass
        tree, actor = 0.0, None
        for p in procs:
            try:
                t = p.cpu_times()
                c = t.user + t.system
                if self.actor is None and "MapWorker" in " ".join(p.cmdline()):
                    self.actor = p
                if self.actor is not None and p.pid == self.actor.pid:
                    actor = c
            except ps.Error:
                continue
            tree += c
        return actor, tree

    def __enter__(self):
        orig, groups = self.orig, self.groups
        offset = time.time() - time.perf_counter()  # wall clock -> perf_counter

        def timed(lake, table, fragments):
            v = orig(lake, table, fragments)
            if table == "tokens":
                self._tokens = sum(json.loads(f)["physical_rows"] for f in fragments)
            elif table == "samples":
                now = time.perf_counter()
                files = [f"{lake.uri(table)}/data/{d['path']}" for f in fragments for d in json.loads(f)["files"]]
                written = max(os.stat(x).st_mtime for x in files) - offset
                groups.append(dict(tokens=self._tokens, committed=now, written=written, cpu=self._cpu()))
            return v

        self.lk.Lake.commit = timed
        return self

    def __exit__(self, *exc):
        self.lk.Lake.commit = self.orig


class StartTimer:
    """Seconds the driver spends in each start-up step of run_capture, by wrapping them where the
    driver looks them up: the plan (of it: the model revision, the tokenizer and the corpus), the Ray
    start, the run lease and the lake's repair scan (prepare_lake: incomplete groups, orphan files)."""

    def __init__(self):
        import tourray.capture.driver as driver
        import tourray.capture.plan as plan
        import tourray.model.identity as identity
        import tourray.runtime as runtime
        from tourray.lake.tables import RunLease

        self.targets = [("plan (all of it)", driver, "plan_capture"), ("  model revision", identity, "model_revision"),
                        ("  tokenizer", plan, "load_tokenizer"), ("  corpus", plan.corpus, "load_samples"),
                        ("Ray start", runtime, "init_ray"), ("run lease", RunLease, "acquire"),
                        ("repair scan (prepare_lake)", driver, "prepare_lake")]
        self.seconds: dict[str, float] = {}

    def __enter__(self):
        self.orig = [(obj, name, getattr(obj, name)) for _, obj, name in self.targets]
        for (label, obj, name), (_, _, fn) in zip(self.targets, self.orig):
            def timed(*a, _fn=fn, _label=label, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.seconds[_label] = round(self.seconds.get(_label, 0.0) + time.perf_counter() - t0, 3)
            setattr(obj, name, timed)
        return self

    def __exit__(self, *exc):
        for obj, name, fn in self.orig:
            setattr(obj, name, fn)


def bench_capture(args, model_dir: Path, sample_dir: Path, lake: Path, run: str) -> dict:
    from tourray.capture import CaptureConfig, run_capture

    extra = {k: getattr(args, k) for k in ("sites", "stats") if getattr(args, k, None) is not None}
    cfg = CaptureConfig(model=str(model_dir), samples=str(sample_dir), lake=str(lake), run=run,
                        system_prompt=str(args.system_prompt), layers="all", store_dtype="float16",
                        batch_size=args.batch_size, group_size=args.group_size, **extra)
    with CommitTimer() as ct, StartTimer() as st:
        t0 = time.perf_counter()
        summary = run_capture(cfg, progress=False)
        wall = time.perf_counter() - t0
    g = ct.groups
    assert sum(x["tokens"] for x in g) == summary["tokens"], (g, summary["tokens"])
    # capture_seconds starts after init_ray, just before the pipeline is built (both rounded to 10 ms)
    start = t0 + summary["seconds"] - summary["capture_seconds"]
    res = dict(run=run, tokens=summary["tokens"], samples=summary["captured"], groups=len(g),
               wall_seconds=round(wall, 2), capture_seconds=summary["capture_seconds"],
               summary_tokens_per_s=summary["tokens_per_s"], wall_tokens_per_s=round(summary["tokens"] / wall, 1),
               bytes_vectors=summary["bytes"], group_tokens=[x["tokens"] for x in g],
               group_tokens_written_order=[x["tokens"] for x in sorted(g, key=lambda x: x["written"])],
               group_written_s=[round(x["written"] - start, 2) for x in g],
               group_committed_s=[round(x["committed"] - start, 2) for x in g],
               commit_lag_s=[round(x["committed"] - x["written"], 2) for x in g],
               actor_found=ct.actor is not None, load1=load1(), start_seconds=st.seconds)
    if len(g) >= 2:
        # actor side: from the end of the first group to the end of the last (groups 2..G)
        w = sorted(g, key=lambda x: x["written"])
        steady_s = w[-1]["written"] - w[0]["written"]
        tokens = sum(x["tokens"] for x in w[1:])
        res.update(steady_seconds=round(steady_s, 3), steady_tokens=tokens, steady_tokens_per_s=round(tokens / steady_s, 1))
        first = w[0]["written"] - start
        res["first_group_seconds"] = round(first, 2)
        # time to the end of group 1 beyond what its tokens take at the steady rate
        res["startup_overhead_seconds"] = round(first - w[0]["tokens"] / res["steady_tokens_per_s"], 2)
        # driver side (Ray Data's delivery as the driver sees it), first to last commit
        dsec = g[-1]["committed"] - g[0]["committed"]
        res["driver_steady_tokens_per_s"] = round(sum(x["tokens"] for x in g[1:]) / dsec, 1) if dsec > 0 else None
        # CPU use over the commit window (a utilisation, so the commits' lag does not matter)
        (a0, tr0), (a1, tr1) = g[0]["cpu"], g[-1]["cpu"]
        if dsec > 0 and a0 is not None and a1 is not None:
            util = (a1 - a0) / dsec
            res.update(steady_actor_cpu_util=round(util, 2), steady_tree_cpu_util=round((tr1 - tr0) / dsec, 2),
                       steady_tokens_per_actor_cpu_s=round(res["steady_tokens_per_s"] / util, 1))
    return res


def sql_queries() -> dict[str, tuple[str, bool]]:
    """name -> (SQL whose first columns are layer, tokens, mean_cos; text tokens only?)."""
    from tourray.lake.sql import query_file

    return {"layer_similarity": (query_file("layer_similarity").read_text(), True),
            "layer_similarity_2026_12_05": (LAYER_SIMILARITY_TOKEN_ROWS_SQL, True),
            "layer_similarity_2026_12_01": (LAYER_SIMILARITY_BEFORE_SQL, True),
            "token_layers_all": (ALL_TOKENS_SQL, False), "self_join_all": (LAYER_PAIR_SQL, False)}


def query_sql(lake: Path, run: str, sql: str) -> tuple[dict, float]:
    """One query from a fresh connection (the connection's set-up is timed too)."""
    from tourray.lake.sql import connect, run_query

    t0 = time.perf_counter()
    con = connect(str(lake))
    rows = run_query(con, sql, dict(run=run)).fetchall()
    s = time.perf_counter() - t0
    con.close()
    return {int(r[0]): dict(tokens=int(r[1]), mean_cos=float(r[2])) for r in rows}, s


def bench_query(lake: Path, pt_dir: Path, num_layers: int, tokens: int, text_tokens: int, rounds: int = 2,
                pt_threads: int | None = None) -> dict:
    """Each SQL form (run "bench1") and each .pt scope 1 + `rounds` times, alternating: the first round
    warms the page cache (untimed: cold files read at disk speed), the best of the others counts
    (short timings, noisy machine). Answers are checked against the .pt files."""
    log("query: mean cosine of layers l-1, l over text tokens and over all tokens ...")
    queries = sql_queries()
    sql_times, pt_times = {name: [] for name in queries}, {"text": [], "all": []}
    sql_res, pt_res = {}, {}
    for timed in (False,) + (True,) * rounds:
        now = {}
        for name, (sql, _text_only) in queries.items():
            sql_res[name], now[name] = query_sql(lake, "bench1", sql)
        for scope in pt_times:
            pt_res[scope], now[f".pt {scope}"] = query_pt(pt_dir, num_layers, scope == "text", pt_threads)
        for k, t in now.items():
            (pt_times[k[4:]] if k.startswith(".pt ") else sql_times[k]).extend([round(t, 3)] * timed)
        log(f"query ({'timed' if timed else 'warm-up'}): " + ", ".join(f"{k} {t:.3f} s" for k, t in now.items()))
    ln_res, ln_s = query_lance_numpy(lake, "bench1", num_layers)
    out = dict(tokens=tokens, text_tokens=text_tokens, lance_numpy_seconds=round(ln_s, 3),
               duckdb_scan_only_seconds=round(query_scan_only(lake, "bench1"), 3),
               connect_seconds=round(connect_seconds(lake), 3),
               max_abs_diff_lance_numpy_pt=max(abs(ln_res[k]["mean_cos"] - pt_res["all"][k]["mean_cos"]) for k in ln_res),
               pt=pt_res, pt_runs=pt_times, pt_threads=pt_threads)
    for name, (sql, text_only) in queries.items():
        scope = "text" if text_only else "all"
        got, want, n = sql_res[name], pt_res[scope], text_tokens if text_only else tokens
        sql_s, pt_s = min(sql_times[name]), min(pt_times[scope])
        out[name] = dict(
            scope=scope, sql_seconds=sql_s, sql_runs=sql_times[name], pt_seconds=pt_s, speedup=ratio(pt_s, sql_s),
            max_abs_diff_pt=max(abs(got[k]["mean_cos"] - want[k]["mean_cos"]) for k in want),
            token_counts_match=list(got) == list(want) and all(got[k]["tokens"] == want[k]["tokens"] == n for k in want),
            sql=got, sql_text=sql.strip())
    return out


def query_ratios(q: dict) -> dict[str, float | None]:
    return {f"query speed-up, {name} ({q[name]['scope']} tokens): (c) .pt time / (b) SQL time": q[name]["speedup"]
            for name in sql_queries()}


def query_targets(q: dict) -> list[dict]:
    return [*(dict(target=f"query {name} ({q[name]['scope']} tokens) >= 10x faster on (b) than .pt",
                   met=q[name]["speedup"] >= 10) for name in ("layer_similarity", "token_layers_all")),
            dict(target="query results (all three SQL forms) agree with .pt to 1e-3, same token counts",
                 met=all(q[k]["max_abs_diff_pt"] <= 1e-3 and q[k]["token_counts_match"] for k in sql_queries()))]


def query_only(out: Path, rounds: int = 2, pt_threads: int | None = None) -> dict:
    """--query-only: the query figures on the lake and .pt files a previous run left in `out`."""
    from tourray.capture.actor import COMMIT_ORDER
    from tourray.lake.optimize import write_block_sums
    from tourray.lake.tables import Lake

    lake, pt_dir = out / "lake", out / "pt_baseline"
    if not (lake / "token_layers.lance").exists() or not (pt_dir / "metadata.jsonl").exists():
        raise SystemExit(f"--query-only needs {lake}/token_layers.lance and {pt_dir}/metadata.jsonl from a full run "
                         "(without --clean)")
    meta = [json.loads(line) for line in (pt_dir / "metadata.jsonl").read_text().splitlines()]
    lk = Lake(str(lake))
    num_layers = lk.read("runs", ["num_layers"], filter="run = 'bench1'").column(0)[0].as_py()
    t0 = time.perf_counter()  # a lake captured before block_sums and the zone maps of `run` gets them
    with lk.lease("optimize") as lease:  # as `tourray optimize` writes them for older lakes
        summed = write_block_sums(lk, lease)
    indexed = lk.index_runs(COMMIT_ORDER)
    log(f"block_sums of {summed} block(s) written, zone maps of run built on {indexed or 'no table (up to date)'} "
        f"in {time.perf_counter() - t0:.2f} s")
    return dict(environment=environment(), samples=len(meta), indexed_now=indexed, block_sums_written=summed, query=bench_query(
        lake, pt_dir, num_layers, sum(m["n_tokens"] for m in meta), sum(m["text_end"] - m["text_start"] for m in meta),
        rounds, pt_threads))


def connect_seconds(lake: Path, repeat: int = 3) -> float:
    """Profiling aid: what opening a connection (a view per table) costs, included in each SQL figure."""
    from tourray.lake.sql import connect

    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        connect(str(lake)).close()
        best = min(best, time.perf_counter() - t0)
    return best


def query_scan_only(lake: Path, run: str) -> float:
    """Profiling aid: DuckDB's scan of every vector, without the self-join."""
    from tourray.lake.sql import connect, run_query

    con = connect(str(lake))
    t0 = time.perf_counter()
    run_query(con, SCAN_SQL, dict(run=run)).fetchall()
    s = time.perf_counter() - t0
    con.close()
    return s


def query_lance_numpy(lake: Path, run: str, num_layers: int) -> tuple[dict, float]:
    """Profiling aid: the same numbers straight from Lance (one scan of the run) with numpy, no join."""
    import numpy as np

    from tourray.lake.tables import Lake, arrow_to_numpy, sql_quote

    t0 = time.perf_counter()
    ds = Lake(str(lake)).dataset("activations")
    t = ds.to_table(columns=["sample_id", "pos", "layer", "h"], filter=f"run = {sql_quote(run)} AND site = 'resid_post'")
    sid = t.column("sample_id").combine_chunks().dictionary_encode().indices.to_numpy()
    layer, pos = t.column("layer").to_numpy(), t.column("pos").to_numpy()
    order = np.lexsort((pos, sid, layer))  # by layer, then sample, then position
    h = arrow_to_numpy(t.column("h"))[order]  # float16 [layers * n, d]
    layers = np.unique(layer)
    assert layers.tolist() == list(range(-1, num_layers))
    h = h.reshape(len(layers), -1, h.shape[1])
    key = (sid[order].reshape(len(layers), -1), pos[order].reshape(len(layers), -1))
    assert (key[0] == key[0][0]).all() and (key[1] == key[1][0]).all()
    out = {}
    for i in range(1, len(layers)):
        a, b = h[i - 1].astype(np.float32), h[i].astype(np.float32)
        cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[int(layers[i])] = dict(tokens=len(cos), mean_cos=float(cos.astype(np.float64).mean()))
    return out, time.perf_counter() - t0


# -- memory ---------------------------------------------------------------------------------------
def _psutil():
    """psutil ships with Ray (ray/thirdparty_files, put on sys.path by `import ray`)."""
    import ray  # noqa: F401

    import psutil

    return psutil


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def capture_subprocess_memory(args, model_dir: Path, sample_dir: Path, lake: Path, run: str, log_path: Path) -> dict:
    """`python -m tourray.cli capture ...` in a fresh process (own embedded Ray); sample the RSS and the
    kernel's peak RSS (VmHWM) of every process of its tree every `interval` s."""
    psutil = _psutil()
    cmd = [sys.executable, "-m", "tourray.cli", "capture", "--model", str(model_dir), "--samples", str(sample_dir),
           "--run", run, "--lake", str(lake), "--system-prompt", str(args.system_prompt), "--layers", "all",
           "--store-dtype", "float16", "--batch-size", str(args.batch_size), "--group-size", str(args.group_size),
           "--no-progress"] + (["--sites", args.sites] if getattr(args, "sites", None) else [])
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=lf, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        seen: dict[int, dict] = {}
        tree_peak, samples_taken, trace = 0, 0, []  # trace: (s, actor RSS MiB, driver RSS MiB) every ~1 s
        while proc.poll() is None:
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total, actor_rss, driver_rss = 0, None, None
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    cmdline = " ".join(p.cmdline())[:120]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                e = seen.setdefault(p.pid, dict(pid=p.pid, cmd=cmdline, rss_max=0, hwm=0))
                if "ray::" in cmdline:
                    e["cmd"] = cmdline  # the title changes as an actor takes tasks
                e["rss_max"] = max(e["rss_max"], rss)
                e["hwm"] = max(e["hwm"], _hwm(p.pid))
                if "MapWorker" in e["cmd"]:
                    actor_rss = rss
                if p.pid == proc.pid:
                    driver_rss = rss
            tree_peak = max(tree_peak, total)
            if samples_taken % max(1, round(1 / args.mem_interval)) == 0:
                trace.append((round(time.perf_counter() - t0, 1), actor_rss and round(actor_rss / 2**20),
                              driver_rss and round(driver_rss / 2**20)))
            samples_taken += 1
            time.sleep(args.mem_interval)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"capture subprocess failed (rc {proc.returncode}); see {log_path}")
    actors = [e for e in seen.values() if "MapWorker" in e["cmd"] or "CaptureStage" in e["cmd"]]
    if not actors:  # fall back to the largest Ray worker
        actors = sorted((e for e in seen.values() if e["cmd"].startswith("ray::")), key=lambda e: -e["hwm"])[:1]
    actor = max(actors, key=lambda e: e["hwm"]) if actors else dict(hwm=0, rss_max=0, cmd="?")
    driver = seen.get(proc.pid, dict(hwm=0, rss_max=0))
    from tourray.lake.tables import Lake, sql_quote

    row = Lake(str(lake)).read("runs", ["manifest"], filter=f"run = {sql_quote(run)}").to_pylist()[0]
    summary = json.loads(row["manifest"])["captures"][-1]
    top = sorted(seen.values(), key=lambda e: -e["hwm"])[:6]
    return dict(samples=summary["captured"], tokens=summary["tokens"], wall_seconds=round(wall, 2),
                capture_seconds=summary["capture_seconds"], summary_tokens_per_s=summary["tokens_per_s"],
                actor_peak_rss=actor["hwm"], actor_sampled_max_rss=actor["rss_max"], actor_cmd=actor["cmd"],
                driver_peak_rss=driver["hwm"], driver_sampled_max_rss=driver["rss_max"],
                tree_sampled_peak_rss_sum=tree_peak, rss_samples=samples_taken, processes_seen=len(seen),
                largest_processes=[dict(cmd=e["cmd"].strip(), peak_rss=e["hwm"]) for e in top], load1=load1(),
                rss_trace_mib=trace)


# -- report ---------------------------------------------------------------------------------------
def environment() -> dict:
    from importlib.metadata import version

    psutil = _psutil()

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "transformers", "ray", "pylance", "pyarrow", "duckdb", "numpy", "tokenizers"):
        try:
            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            pass
    return dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
                python=platform.python_version(), cpu_model=cpu, cores=os.cpu_count(),
                ram_gib=round(psutil.virtual_memory().total / 2**30, 1), versions=versions,
                command=" ".join([Path(sys.executable).name] + sys.argv))


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


RULE = "-" * 76


def fmt_row(label: str, value, spec: str = ",.0f") -> str:
    v = "-" if value is None else (value if isinstance(value, str) else format(value, spec))
    return f"{label:<62}{v:>14}"


def fmt_query(q: dict) -> list[str]:
    lines = []
    for name in sql_queries():
        x = q[name]
        lines.append(fmt_row(f"query {name} ({x['scope']} tokens), SQL: s (best of {x['sql_runs']})", x["sql_seconds"], ".3f"))
        lines.append(fmt_row(f"query {name}: speed-up over .pt; max |SQL - pt| of mean_cos",
                             f"{x['speedup']:.2f}x; {x['max_abs_diff_pt']:.1e}"))
    for scope, runs in q["pt_runs"].items():
        lines.append(fmt_row(f"query (c) torch.load + torch, {scope} tokens: s (best of {runs})", min(runs), ".3f"))
    lines.append(fmt_row("query (b) connect(), included in each SQL figure (profile): s", q["connect_seconds"], ".3f"))
    lines.append(fmt_row("query (b) DuckDB scan of h only, no join (profile): s", q["duckdb_scan_only_seconds"], ".2f"))
    lines.append(fmt_row("query Lance + numpy, all tokens, not SQL (profile): s", q["lance_numpy_seconds"], ".2f"))
    return lines


def fmt_table(r: dict) -> str:
    lines = []

    def row(label, value, spec=",.0f"):
        lines.append(fmt_row(label, value, spec))

    rule = RULE
    row("measure", "value")
    lines.append(rule)
    row("samples", r["samples"])
    row("tokens (incl. system prompt and template)", r["tokens"])
    for i, x in enumerate(r["plain_runs"]):
        row(f"(a) plain forward, run {i + 1}: tokens/s  [cpu util {x['cpu_util']}]", x["tokens_per_s"])
    for i, x in enumerate(r["pt_runs"]):
        row(f"(c) hooks + .pt per sample, run {i + 1}: tokens/s  [cpu util {x['cpu_util']}]", x["tokens_per_s"])
    for b in r["capture"]:
        name = b["run"]
        row(f"(b) capture {name}: wall s (bench1 incl. Ray start)", b["wall_seconds"], ".1f")
        row(f"(b) capture {name}: capture_seconds", b["capture_seconds"], ".1f")
        row(f"(b) capture {name}: tokens/s (summary)", b["summary_tokens_per_s"])
        if "steady_tokens_per_s" in b:
            row(f"(b) capture {name}: tokens/s steady, groups 2..{b['groups']}, actor side"
                f"  [cpu util {b.get('steady_actor_cpu_util')}]", b["steady_tokens_per_s"])
            row(f"(b) capture {name}: tokens/s, same from the driver's commits", b["driver_steady_tokens_per_s"])
            row(f"(b) capture {name}: start-up s (actor start + model load)", b["startup_overhead_seconds"], ".1f")
            row(f"(b) capture {name}: commit lag s, median (written -> committed)",
                sorted(b["commit_lag_s"])[len(b["commit_lag_s"]) // 2], ".1f")
    lines.append(rule)
    row("(a) mean tokens/s", r["plain"]["tokens_per_s"])
    row("(b) mean steady tokens/s", r["capture_mean"]["steady_tokens_per_s"])
    row("(b) mean summary tokens/s", r["capture_mean"]["summary_tokens_per_s"])
    row("(c) mean tokens/s", r["pt_baseline"]["tokens_per_s"])
    row("(a) tokens per CPU-s", r["plain"]["tokens_per_cpu_s"])
    row("(b) tokens per actor CPU-s (steady)", r["capture_mean"]["steady_tokens_per_actor_cpu_s"])
    row("(c) tokens per CPU-s", r["pt_baseline"]["tokens_per_cpu_s"])
    lines.append(rule)
    for k, v in r["ratios"].items():
        row(k, v, ".3f")
    lines.append(rule)
    lines += fmt_query(r["query"])
    m = r.get("memory")
    if m:
        lines.append(rule)
        for k in ("1x", "4x"):
            x = m[k]
            row(f"memory {k} ({x['samples']} samples, {x['tokens']:,} tokens): actor peak MiB", x["actor_peak_rss"] / 2**20)
            row(f"memory {k}: driver peak MiB", x["driver_peak_rss"] / 2**20)
            row(f"memory {k}: process tree, sampled peak of summed RSS MiB", x["tree_sampled_peak_rss_sum"] / 2**20)
            row(f"memory {k}: capture tokens/s (summary)", x["summary_tokens_per_s"])
    lines.append(rule)
    for t in r["targets"]:
        row(t["target"], "MET" if t["met"] else "NOT MET")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets: (b) steady >= 0.85x (a), end to end (bench1, Ray start included) >= 0.6x (a); "
                                       "(b) faster than (c); query >= 10x faster on (b); capture peak memory at 4x within "
                                       "20% of 1x.")
    p.add_argument("--quick", action="store_true", help="Smoke size: 16 samples and group size 4 (unless given).")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="Output folder (default: bench/out, gitignored).")
    p.add_argument("--samples", type=Path, default=REPO / "samples" / "train", help="Source texts (default: samples/train).")
    p.add_argument("--system-prompt", type=Path, default=REPO / "samples" / "system_prompt.md")
    p.add_argument("-n", "--num-samples", type=int, default=None, help="Samples to use (default: all; --quick: 16).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=None, help="Samples per capture group (default 32; --quick: 4).")
    p.add_argument("--model", type=Path, default=None,
                   help="An existing checkpoint folder to capture (e.g. .cache/smollm2-135m-instruct) instead of the "
                        "synthetic Qwen3 that the size options below describe.")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=1536)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-factor", type=int, default=4, help="Repeat factor of the large memory run (default 4).")
    p.add_argument("--mem-interval", type=float, default=0.2, help="RSS sampling interval, s (default 0.2).")
    p.add_argument("--skip-memory", action="store_true", help="Skip the 1x/Nx peak-memory captures.")
    p.add_argument("--query-only", action="store_true",
                   help="Only the query figures, on the lake and .pt files a previous full run left in --out.")
    p.add_argument("--query-rounds", type=int, default=2, help="Timed rounds of the query figures (best counts; default 2).")
    p.add_argument("--pt-threads", type=int, default=None,
                   help="torch threads of the .pt query figures (default: all cores). On a shared machine use 1: two "
                        "torch threads spin against other processes (28-58 s instead of ~1 s seen on 2 cores).")
    p.add_argument("--clean", action="store_true", help="Delete the bulk data (model, lakes, .pt files) at the end.")
    args = p.parse_args(argv)
    n = args.num_samples or (16 if args.quick else None)
    args.group_size = args.group_size or (4 if args.quick else 32)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = args.out.resolve()
    if args.query_only:
        res = query_only(out, args.query_rounds, args.pt_threads)
        res["targets"] = query_targets(res["query"])
        (out / "results_query.json").write_text(json.dumps(res, indent=1, default=str))
        print("\n".join([RULE, *fmt_query(res["query"]), RULE, *(fmt_row(t["target"], "MET" if t["met"] else "NOT MET")
                                                              for t in res["targets"])]))
        print(f"\nwritten {out / 'results_query.json'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in BULK:
        shutil.rmtree(out / name, ignore_errors=True)

    res: dict = dict(environment=environment(), settings=dict(
        samples=n or "all", batch_size=args.batch_size, group_size=args.group_size, store_dtype="float16",
        layers="all", model_dtype="float32", torch_threads=torch.get_num_threads(), quick=args.quick,
        mem_factor=args.mem_factor, load1_start=load1()))
    log(f"environment: {res['environment']['cpu_model']}, {res['environment']['cores']} cores, "
        f"load {res['settings']['load1_start']}")

    # 1-2. texts, tokenizer, model
    samples_dir = out / "samples"
    files = copy_samples(args.samples, n, samples_dir)
    all_train = [f.read_text(encoding="utf-8") for f in sorted(args.samples.glob("*.txt"))]
    if args.model:
        model_dir = args.model.resolve()
        res["model"] = describe_model(model_dir)
    else:
        model_dir = out / "model"
        res["model"] = build_model(model_dir, all_train, args)
    batches, tokens = encode_batches(model_dir, samples_dir, args.system_prompt, args.batch_size, args.group_size)
    res["tokens"], res["samples"], res["batches"] = tokens, len(files), len(batches)
    res["padded_tokens"] = sum(b["ids"].numel() for b in batches)

    # 3. throughput, in the order a c b b c a so that drift in the machine's load (other work shares
    # the cores) weighs on each approach alike; each figure is a mean over its runs
    model = load_model(model_dir)
    res["model"]["params"] = sum(p.numel() for p in model.parameters())
    log(f"model: {res['model']['params'] / 1e6:.1f} M params, {res['model']['layers']} blocks <- {model_dir}; "
        f"{len(files)} samples -> {samples_dir}")
    log(f"{tokens:,} tokens in {len(batches)} batches ({res['padded_tokens']:,} with padding)")
    pt_dir = out / "pt_baseline"
    lake = out / "lake"
    plain_runs, pt_runs, cap_runs = [], [], []

    def run_a():
        log("(a) plain forward ...")
        plain_runs.append(bench_plain(model, batches, tokens))
        log(f"(a) {plain_runs[-1]['tokens_per_s']:,.0f} tokens/s (cpu util {plain_runs[-1]['cpu_util']})")

    def run_c():
        log("(c) hooks + .pt per sample ...")
        pt_runs.append(bench_pt(model, batches, tokens, pt_dir))
        log(f"(c) {pt_runs[-1]['tokens_per_s']:,.0f} tokens/s (cpu util {pt_runs[-1]['cpu_util']})")

    run_a()
    run_c()
    for run in ("bench1", "bench2"):  # two runs into one lake; the second finds Ray already started
        log(f"(b) run_capture {run} ...")
        cap_runs.append(bench_capture(args, model_dir, samples_dir, lake, run))
        b = cap_runs[-1]
        log(f"(b) {run}: summary {b['summary_tokens_per_s']:,.0f} tokens/s, steady "
            f"{b.get('steady_tokens_per_s', float('nan')):,.0f} tokens/s (actor cpu util "
            f"{b.get('steady_actor_cpu_util')}), wall {b['wall_seconds']} s")
    import ray

    ray.shutdown()
    run_c()
    run_a()
    model = None  # free it before the memory runs
    res["plain_runs"], res["pt_runs"], res["capture"] = plain_runs, pt_runs, cap_runs

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return round(sum(xs) / len(xs), 1) if xs else None

    a_rate, a_cpu = mean(x["tokens_per_s"] for x in plain_runs), mean(x["tokens_per_cpu_s"] for x in plain_runs)
    c_rate, c_cpu = mean(x["tokens_per_s"] for x in pt_runs), mean(x["tokens_per_cpu_s"] for x in pt_runs)
    res["plain"] = dict(tokens=tokens, tokens_per_s=a_rate, tokens_per_cpu_s=a_cpu)
    res["pt_baseline"] = dict(tokens=tokens, tokens_per_s=c_rate, tokens_per_cpu_s=c_cpu,
                              bytes_on_disk=pt_runs[-1]["bytes_on_disk"], files=pt_runs[-1]["files"])
    b_steady = mean(x.get("steady_tokens_per_s") for x in cap_runs)
    b_summary = mean(x["summary_tokens_per_s"] for x in cap_runs)
    b_cpu = mean(x.get("steady_tokens_per_actor_cpu_s") for x in cap_runs)
    res["capture_mean"] = dict(steady_tokens_per_s=b_steady, summary_tokens_per_s=b_summary,
                               steady_tokens_per_actor_cpu_s=b_cpu, bytes_vectors=cap_runs[0]["bytes_vectors"])

    res["query"] = bench_query(lake, pt_dir, res["model"]["layers"], tokens, sum(z - a for b in batches for a, z in b["text_spans"]),
                               args.query_rounds, args.pt_threads)

    # 4. memory
    if not args.skip_memory:
        res["memory"] = {}
        big = out / f"samples_{args.mem_factor}x"
        copy_samples(args.samples, n, big, repeat=args.mem_factor)
        for label, sdir in (("1x", samples_dir), (f"{args.mem_factor}x", big)):
            log(f"memory: capture {label} in a subprocess ...")
            m = capture_subprocess_memory(args, model_dir, sdir, out / f"lake_mem_{label}", f"mem{label}",
                                          out / f"capture_mem_{label}.log")
            res["memory"]["4x" if label != "1x" else "1x"] = m
            log(f"memory {label}: actor peak {m['actor_peak_rss'] / 2**20:,.0f} MiB, driver peak "
                f"{m['driver_peak_rss'] / 2**20:,.0f} MiB, {m['summary_tokens_per_s']:,.0f} tokens/s")

    # ratios and targets
    best = lambda xs: max((x for x in xs if x is not None), default=None)  # noqa: E731
    res["ratios"] = {
        "(b)/(a) steady tokens/s": ratio(b_steady, a_rate),
        "(b)/(a) steady tokens/s, best run of each": ratio(best(x.get("steady_tokens_per_s") for x in cap_runs),
                                                            best(x["tokens_per_s"] for x in plain_runs)),
        "(b)/(a) summary tokens/s (incl. actor start + load)": ratio(b_summary, a_rate),
        "(b)/(a) wall tokens/s, run 1 (incl. Ray start)": ratio(cap_runs[0]["wall_tokens_per_s"], a_rate),
        "(b)/(a) tokens per CPU-s (steady actor vs (a) process)": ratio(b_cpu, a_cpu),
        "(c)/(a) tokens/s": ratio(c_rate, a_rate),
        "(c)/(a) tokens per CPU-s": ratio(c_cpu, a_cpu),
        "(b)/(c) steady tokens/s": ratio(b_steady, c_rate),
        "(b)/(c) steady tokens/s, best run of each": ratio(best(x.get("steady_tokens_per_s") for x in cap_runs),
                                                            best(x["tokens_per_s"] for x in pt_runs)),
        "(b)/(c) summary tokens/s": ratio(b_summary, c_rate),
        "(b)/(c) tokens per CPU-s": ratio(b_cpu, c_cpu),
        **query_ratios(res["query"]),
    }
    targets = [
        dict(target="(b) >= 0.85x (a): steady tokens/s", met=bool(b_steady and b_steady >= 0.85 * a_rate)),
        dict(target="(b) >= 0.6x (a): end to end, run 1 (Ray start included)",
             met=cap_runs[0]["wall_tokens_per_s"] >= 0.6 * a_rate),
        dict(target="(b) faster than (c): steady tokens/s", met=bool(b_steady and b_steady > c_rate)),
        dict(target="(b) faster than (c): summary tokens/s", met=b_summary > c_rate),
        *query_targets(res["query"]),
    ]
    if "memory" in res:
        m1, m4 = res["memory"]["1x"], res["memory"]["4x"]
        res["ratios"]["actor peak RSS 4x/1x"] = ratio(m4["actor_peak_rss"], m1["actor_peak_rss"])
        res["ratios"]["driver peak RSS 4x/1x"] = ratio(m4["driver_peak_rss"], m1["driver_peak_rss"])
        res["ratios"]["tree sampled peak RSS 4x/1x"] = ratio(m4["tree_sampled_peak_rss_sum"], m1["tree_sampled_peak_rss_sum"])
        targets.append(dict(target="actor peak RSS 4x within 20% of 1x", met=res["ratios"]["actor peak RSS 4x/1x"] <= 1.2))
        targets.append(dict(target="driver peak RSS 4x within 20% of 1x", met=res["ratios"]["driver peak RSS 4x/1x"] <= 1.2))
    res["targets"] = targets
    res["settings"]["load1_end"] = load1()

    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print()
    print(fmt_table(res))
    print(f"\nwritten {out / 'results.json'}")
    if args.clean:
        for name in BULK:
            shutil.rmtree(out / name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
