#!/usr/bin/env python
"""Tour-guide serving benchmark: time to first token and time to a full brief answer (p50 / p95) for
the original and a compressed SmolLM2, with 1 client and 8 concurrent clients, through the real app
(`tourray serve`: Ray Serve, one deployment per model, HTTP, Server-Sent Events).

    python bench/bench_serve.py --original .cache/smollm2-135m-instruct --compressed .cache/smol-w75
    python bench/bench_serve.py ... --in-process      # uvicorn in this process instead of Ray Serve

Each request is a "brief" tour (max_new_tokens 80, the server's default decoding) for a pin cycling
over corpus stops in several cities, so prompts differ. TTFT = request sent -> first `token` event
received; full = request sent -> the `done` event; tokens are the generated token ids the server
counts with the model's tokenizer (`n_new_tokens`, eos included). Both models warm up first (the
VM hands freed memory back to the host: cold pages would be measured otherwise). The two models are
measured in turn under the same load (one client: requests alternate between them; 8 clients: whole
rounds in A B B A order), so a shared machine's load swings fall on both. With 8 clients each sends
its requests back to back; a model replica generates one streamed answer at a time, so the others
queue (that is the point of the measurement). `--batched` also measures 8 clients with
`stream: false`, which the model deployment batches (up to --max-batch-size prompts per generate).
Results: bench/out/serve.json (gitignored) and a Markdown table on stdout for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PINS = [(-33.8568, 151.2153), (34.3853, 109.2785), (40.7484, -73.9857), (41.8902, 12.4922), (48.8584, 2.2945),
        (34.2611, 108.9425), (-33.8523, 151.2108), (35.0394, 135.7292), (41.4036, 2.1744), (64.1417, -21.9266)]
TAGS = [["history"], ["architecture"], ["history", "people"], ["engineering"], ["food", "culture"]]


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(host, port, body, stream=True) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/api/tour", json.dumps(dict(body, stream=stream)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, done, buf = None, None, b""
    if not stream:
        done = json.loads(resp.read())
        first = t0 + done["ttft_ms"] / 1000  # the server's own first-token time (no events to see)
    while stream:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            if not block.startswith(b"data: "):
                continue
            ev = json.loads(block[6:])
            if "token" in ev and first is None:
                first = time.perf_counter()
            if ev.get("done"):
                done = ev
            if "error" in ev:
                raise RuntimeError(ev["error"])
    end = time.perf_counter()
    conn.close()
    return {"ttft_s": (first or end) - t0, "full_s": end - t0, "tokens": done["n_new_tokens"],
            "server_ttft_ms": done["ttft_ms"], "decode_tokens_per_s": done["tokens_per_s"], "queued_ms": done.get("queued_ms"),
            "batch_size": done.get("batch_size", 1), "text": done["text"]}


def body_for(k, model):
    return dict(lat=PINS[k % len(PINS)][0], lng=PINS[k % len(PINS)][1], tags=TAGS[k % len(TAGS)], style="brief", model=model)


def run_clients(host, port, model, clients, per_client, stream=True, offset=0) -> tuple[list, list, float]:
    """`clients` threads, each sending `per_client` requests back to back: (results, errors, wall seconds)."""
    results, errors = [], []
    lock = threading.Lock()

    def client(c):
        for i in range(per_client):
            try:
                r = one_request(host, port, body_for(offset + c * per_client + i, model), stream)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - t0


def summarise(model, clients, stream, results, errors, wall, loads) -> dict:
    ttft = [r["ttft_s"] for r in results]
    full = [r["full_s"] for r in results]
    toks = sum(r["tokens"] for r in results)
    return {"model": model, "clients": clients, "requests": len(results), "errors": errors, "stream": stream,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95), "full_p50_s": pct(full, 0.5), "full_p95_s": pct(full, 0.95),
            "tokens_mean": toks / max(len(results), 1), "throughput_tokens_per_s": toks / wall, "wall_s": wall,
            "decode_tokens_per_s_p50": pct([r["decode_tokens_per_s"] for r in results if r["decode_tokens_per_s"]], 0.5),
            "batch_size_max": max((r["batch_size"] for r in results), default=1),
            "loadavg_1m": [round(min(loads), 2), round(max(loads), 2)], "sample_text": results[0]["text"] if results else None}


def paired(host, port, models, clients, per_client, rounds, stream=True, offset=0) -> list[dict]:
    """The models measured in turn under the same load: 1 client alternates A, B, A, B request by
    request; with several clients, whole rounds go A B B A ... Returns one summary per model."""
    acc = {m: ([], [], 0.0) for m in models}
    loads = [os.getloadavg()[0]]
    order = [models[(i // 2 + i) % 2 if clients > 1 else i % 2] for i in range(2 * rounds)]  # ABBA.. or ABAB..
    for i, m in enumerate(order):
        res, err, wall = run_clients(host, port, m, clients, per_client, stream, offset + i * clients * per_client)
        r0, e0, w0 = acc[m]
        acc[m] = (r0 + res, e0 + err, w0 + wall)
        loads.append(os.getloadavg()[0])
    return [summarise(m, clients, stream, *acc[m], loads) for m in models]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", default=".cache/smollm2-135m-instruct")
    ap.add_argument("--compressed", default=".cache/smol-w75")
    ap.add_argument("--single", type=int, default=12, help="Requests of the 1-client setting, per model (alternating models).")
    ap.add_argument("--per-client", type=int, default=1, help="Requests per client in a round of 8 clients.")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of 8 clients per model (in A B B A order); 0: 1 client only.")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="Untimed requests per model first.")
    ap.add_argument("--batched", action="store_true", help="Also 8 clients with stream: false (batched by the deployment).")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per model replica (default: every core).")
    ap.add_argument("--in-process", action="store_true", help="uvicorn in this process instead of Ray Serve.")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default="bench/out/serve.json")
    args = ap.parse_args()

    from tourray.serve.config import ServeConfig
    from tourray.serve.deploy import run_serve

    cfg = ServeConfig(model=args.compressed, compare=args.original, port=args.port, max_batch_size=args.max_batch_size,
                      threads=args.threads, in_process=args.in_process)
    if args.in_process:
        threading.Thread(target=run_serve, args=(cfg,), daemon=True).start()
    else:
        run_serve(cfg, block=False)
    host, port = cfg.host, cfg.port
    for _ in range(600):
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", "/api/health")
            health = json.loads(c.getresponse().read())
            break
        except (OSError, ValueError):
            time.sleep(1)
    else:
        raise SystemExit("server did not come up")
    print(json.dumps({k: {x: v[x] for x in ("label", "parameters", "layers", "intermediate_size", "threads")}
                      for k, v in health["models"].items()}), flush=True)
    names = {"main": "compressed", "compare": "original"}
    for m in names:  # warm up
        for k in range(args.warmup):
            one_request(host, port, dict(lat=PINS[k][0], lng=PINS[k][1], tags=["history"], style="brief", model=m))
    rows = []
    models = ("compare", "main")  # original, compressed: measured in turn under the same load
    settings = [(1, 1, args.single, True, 0), (args.clients, args.per_client, args.rounds, True, 100)]
    if args.batched:
        settings.append((args.clients, args.per_client, args.rounds, False, 200))
    for clients, per_client, rounds, stream, offset in (s for s in settings if s[2] > 0):
        for r in paired(host, port, models, clients, per_client, rounds, stream, offset):
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "sample_text"}), flush=True)
    for r in rows:
        r["which"] = names[r["model"]]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    out = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
           "server": "in-process uvicorn" if args.in_process else "Ray Serve", "models": health["models"], "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\n| model | parameters | clients | requests | TTFT p50 / p95 (s) | full brief answer p50 / p95 (s) | tokens/answer | "
          "decode tokens/s p50 | throughput tokens/s | load avg (1 min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        p = health["models"][r["model"]]["parameters"]
        kind = "" if r["stream"] else " (not streamed, batched up to %d)" % r["batch_size_max"]
        print(f"| {r['which']}{kind} | {p / 1e6:.1f} M | {r['clients']} | {r['requests']} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
              f"{r['full_p50_s']:.2f} / {r['full_p95_s']:.2f} | {r['tokens_mean']:.0f} | {r['decode_tokens_per_s_p50'] or 0:.1f} | "
              f"{r['throughput_tokens_per_s']:.1f} | {r['loadavg_1m'][0]} -> {r['loadavg_1m'][1]} |")
    if not args.in_process:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
