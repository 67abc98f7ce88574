#!/usr/bin/env python
"""Where a capture's time goes on a real model, in one process (no Ray), per token.

On SmolLM2-135M-Instruct (make demo's import at .cache/smollm2-135m-instruct) with both sites of every
layer stored as float16, batches of 8 of the train texts behind the system prompt:

  plain    the model's own batched forward over the same padded ids (LM head included)
  engine   HFEngine.capture: the forward with hooks, the host copy of every hooked tensor in the store
           dtype, surprisal and entropy (float32 log-softmax over the vocabulary)
  + sink   with --stats (e.g. units): the same with the inline-statistics sink fed from the hooks
  stage    CaptureStage.process on one group: engine + the stage's own work (token tables, token_layers,
           block checksums, Arrow, Lance data files; no commit), overlapped on two threads
  pieces   the stage's own work alone, on one batch's captured output: what each costs per token
  lance    the same activations data files written at each Lance file version

Forward passes run on the stage's forward thread, as in the actor. Each row is the best of --reps passes,
with that pass's CPU seconds (user / system) and minor page faults, for the whole process.

Usage:  .venv/bin/python bench/profile_capture.py [--model DIR] [--samples 16] [--threads 2] [--stats units]
Prints a table (ms per token and ratios to plain); nothing is kept (lakes in a temporary folder).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / ".cache/smollm2-135m-instruct"), help="Checkpoint folder (default: %(default)s).")
    p.add_argument("--samples", type=int, default=16, help="Texts (one group; default %(default)s).")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores).")
    p.add_argument("--stats", default="", help="Inline statistics of the stage, e.g. units (default: none).")
    p.add_argument("--reps", type=int, default=2, help="Passes per row, the best kept (default %(default)s).")
    args = p.parse_args()
    os.chdir(REPO)
    import lance
    import numpy as np
    import pyarrow as pa
    import torch

    from tourray.capture import CaptureConfig
    from tourray.capture.actor import CaptureStage
    from tourray.capture.plan import plan_capture
    from tourray.model.prompt import right_padded

    tmp = Path(tempfile.mkdtemp(prefix="profile-capture-"))
    cfg = CaptureConfig(model=args.model, samples="samples", include=["train/*"], run="p", lake=str(tmp / "lake"),
                        system_prompt="samples/system_prompt.md", sites="resid_post,resid_mid", max_length=1024,
                        batch_size=8, group_size=args.samples, threads=args.threads, stats=args.stats)
    plan = plan_capture(cfg)
    samples = plan.samples[: args.samples]
    stage = CaptureStage(plan.actor_cfg, cfg.lake, plan.layers, plan.info.hidden_size, plan.info.num_layers, plan.stored,
                         plan.system_prompt, plan.tokenizer)
    torch.set_num_threads(args.threads)
    group = pa.table({c: [getattr(s, c) for s in samples] for c in ("sample_id", "source", "category", "text", "sha256")})
    encoded = [stage.fmt.encode(s.text, cfg.max_length) for s in samples]
    enc, spans = [e.input_ids for e in encoded], [stage._text_span(e) for e in encoded]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    batches = [order[a : a + 8] for a in range(0, len(order), 8)]
    ntok = sum(len(e) for e in enc)
    model = stage.engine.model

    def plain():
        with torch.inference_mode():
            for idx in batches:
                ids, mask = right_padded([enc[i] for i in idx])
                model(input_ids=ids, attention_mask=mask)

    def engine():
        for idx in batches:
            stage.engine.capture([enc[i] for i in idx])

    def engine_sink():
        for idx in batches:
            stage.inline.reset()
            stage.engine.capture([enc[i] for i in idx],
                                 sink=lambda t, n, idx=idx: stage.inline(t, n, [spans[i] for i in idx]))

    def best(f, n_tokens, forward_thread=False):
        """(ms per token, user s, system s, minor faults) of the fastest of --reps passes."""
        out = []
        for _ in range(args.reps):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            stage._forward_thread.submit(f).result() if forward_thread else f()
            t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            out.append((1e3 * t / n_tokens, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
        return min(out)

    stage._forward_thread.submit(plain).result()  # warm-up
    rows = [("plain forward", best(plain, ntok, True)), ("engine.capture", best(engine, ntok, True))]
    if stage.inline is not None:
        rows.append((f"engine.capture + {args.stats} sink", best(engine_sink, ntok, True)))
    rows.append(("stage.process (engine + the stage's work, 2 threads)", best(lambda: stage.process(group), ntok)))
    idx = batches[0]
    caps = stage.engine.capture([enc[i] for i in idx])
    nb = sum(len(enc[i]) for i in idx)
    pend = [(samples[i].sample_id, layer, site, h) for i, c in zip(idx, caps) for (layer, site), h in c.vectors.items()]
    rb = stage._activations_batch(pend)

    # fed as the stage feeds the writer: record batches of ~_ROWS_PER_BATCH_BYTES (one 231 MB batch made Lance
    # 2.1's encoder map and fault ~108k pages, 0.6 s of system CPU, that the stage's writes never pay)
    rows_per_batch = max(1, stage._ROWS_PER_BATCH_BYTES * rb.num_rows // max(1, rb.nbytes))

    def write(version=None):
        d = tempfile.mkdtemp(dir=tmp)
        lance.fragment.write_fragments(pa.Table.from_batches([rb]).to_reader(max_chunksize=rows_per_batch), f"{d}/a.lance",
                                       schema=stage.schemas["activations"], **({"data_storage_version": version} if version else {}))

    pieces = [("  token_layers rows (norms, cosines)", lambda: [stage._token_layers_table({"sample_id": samples[i].sample_id, "source": samples[i].source}, c, spans[i])
                                                                   for i, c in zip(idx, caps)]),
              ("  sha256 of every block", lambda: [hashlib.sha256(np.ascontiguousarray(h)).hexdigest() for c in caps for h in c.vectors.values()]),
              ("  activations Arrow batch", lambda: stage._activations_batch(pend)),
              ("  Lance data files, default version", write)]
    pieces += [(f"  Lance data files, version {v}", lambda v=v: write(v)) for v in ("2.0", "2.1")]
    rows += [(name, best(f, nb)) for name, f in pieces]
    print(f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, lance {lance.__version__}, "
          f"{args.threads} threads, {len(samples)} texts, {ntok} tokens, model {args.model}")
    base = rows[0][1][0]
    print(f"{'':56} {'ms/token':>9} {'x plain':>8} {'user s':>7} {'sys s':>6} {'faults':>8}")
    for name, (ms, user, sys_s, faults) in rows:
        print(f"{name:56} {ms:9.3f} {base / ms if not name.startswith('  ') else ms / base:8.2f} {user:7.2f} {sys_s:6.2f} "
              f"{faults:8d}" + ("" if not name.startswith("  ") else "  (share of plain)"))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
