"""The driver: plan, build the Ray Data pipeline (or run the stage in-process), commit each group's
fragments in `COMMIT_ORDER` as its result arrives, finalise inline statistics, record the summary.

    samples ──► ray.data (one block per group) ──map_batches(CaptureStage, actor pool)──► driver
                                                  │ engine + hooks, built once per actor      │
                                                  └─► Lance fragments (written by the actor)  └─► commit

Samples are committed last, so a `samples` row marks a complete sample; a re-run first deletes rows
of samples that never got theirs (a killed run), then captures only what is missing.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Iterator, Literal

import pyarrow as pa

from tourray import corpus
from tourray.capture.config import CaptureConfig
from tourray.capture.plan import Plan, groups, plan_capture, prepare_lake
from tourray.capture.stage import COMMIT_ORDER, CaptureStage
from tourray.config import compact_layers
from tourray.manifest import record_summary
from tourray.stats.inline import finalize

log = logging.getLogger("tourray")



def _stage_kwargs(plan: Plan) -> dict:
    return dict(cfg=plan.cfg, lake_root=plan.lake.root, layers=plan.layers, hidden_size=plan.info.hidden_size,
                num_layers=plan.info.num_layers, stored=plan.stored)


def build_capture(plan: Plan, pending: list[corpus.Sample]):
    """The lazy Ray Data pipeline: one block per group of samples -> CaptureStage actor pool."""
    import ray

    cfg = plan.cfg
    return ray.data.from_arrow(groups(plan, pending)).map_batches(
        CaptureStage,
        fn_constructor_kwargs=_stage_kwargs(plan),
        batch_size=cfg.group_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )


def local_capture(plan: Plan, pending: list[corpus.Sample]) -> Iterator[pa.Table]:
    """The same stage run in this process, group by group: the executor for a capture that is itself
    one Ray task (e.g. a pruning sweep's variant), where an actor pool per task would oversubscribe."""
    stage = CaptureStage(**_stage_kwargs(plan))
    for group in groups(plan, pending):
        yield stage(group)


def run_capture(cfg: CaptureConfig, progress: bool = True, executor: Literal["ray", "local"] = "ray") -> dict:
    """Plan, then capture what is missing, committing each group as its result arrives. `executor`
    "local" runs the stage in this process instead of a Ray Data actor pool (same tables, same commits)."""
    from tqdm import tqdm

    from tourray.runtime import init_ray, user_error_in

    t0 = time.perf_counter()
    plan = plan_capture(cfg)
    done = prepare_lake(plan)
    pending = [s for s in plan.samples if s.sample_id not in done]
    summary = dict(run=cfg.run, lake=plan.lake.root, samples=len(plan.samples), already_done=len(plan.samples) - len(pending),
                   captured=0, tokens=0, bytes=0, groups=0, truncated=[], skipped_invalid=plan.skipped)
    log.info("run %s: %d samples, %d already committed, %d to capture (layers %s, sites %s, %s)",
             cfg.run, len(plan.samples), summary["already_done"], len(pending),
             compact_layers(plan.layers), ",".join(s.value for s in cfg.sites), cfg.store_dtype.value)
    if pending:
        bar = tqdm(total=len(pending), unit="sample", disable=not progress, dynamic_ncols=True)
        t1 = time.perf_counter()
        try:
            if executor == "local":
                results = local_capture(plan, pending)
            else:
                init_ray(cfg.address)
                # prefetch_batches=0: commit each group as soon as it arrives (a prefetching iterator
                # holds a result back until the next one, so a kill would lose two groups, not one)
                results = build_capture(plan, pending).iter_batches(batch_size=None, prefetch_batches=0,
                                                                    batch_format="pyarrow")
            for row in (r for b in results for r in b.to_pylist()):
                frags = json.loads(row["fragments"])
                for table in COMMIT_ORDER:
                    plan.lake.commit(table, frags.get(table, []))
                summary["groups"] += 1
                summary["captured"] += row["n_samples"]
                summary["tokens"] += row["n_tokens"]
                summary["bytes"] += row["bytes"]
                for src in row["truncated"]:
                    log.warning("truncated %s to --max-length %d tokens", src, cfg.max_length)
                summary["truncated"] += list(row["truncated"])
                dt_s = time.perf_counter() - t1
                bar.update(row["n_samples"])
                bar.set_postfix_str(f"{summary['captured'] / dt_s:.2f} samples/s, {summary['tokens'] / dt_s:,.0f} tokens/s")
        except Exception as e:  # noqa: BLE001 - surface a user error raised inside an actor as itself
            raise user_error_in(e) or e
        finally:
            bar.close()
        summary["capture_seconds"] = round(time.perf_counter() - t1, 2)
        summary["tokens_per_s"] = round(summary["tokens"] / max(summary["capture_seconds"], 1e-9), 1)
    if cfg.stats and (pending or not plan.lake.exists("layer_stats")):
        summary["inline_stats"] = finalize(plan.lake, cfg.run)  # merge the groups' parts into layer/pair stats
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    record_summary(plan.lake, cfg.run, summary)
    return summary
