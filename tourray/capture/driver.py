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
import os
import logging
import time
from typing import Iterator, Literal

import pyarrow as pa

from tourray.capture.config import CaptureConfig
from tourray.capture.plan import Plan, groups, plan_capture, prepare_lake
from tourray.capture.actor import COMMIT_ORDER, CaptureStage
from tourray.config import compact_layers
from tourray.errors import UserError
from tourray.lake.tables import RunLease
from tourray.lake.runs import record_summary
from tourray.lake.repair import clean_marks
from tourray.stats.inline import finalize, finalized

log = logging.getLogger("tourray")



#: Tries of one group before the capture fails: an actor that dies on it (out of memory, a crash) is
#: restarted and the group retried this many times in all; a Python error in the stage fails at once
#: (it would fail the same way again). Without a bound Ray Data restarts actors forever.
MAX_TRIES = 3


def group_name(group: pa.Table) -> str:
    """A group as a user can find it: its first and last sample sources."""
    src = group.column("source").to_pylist()
    return f"{src[0]} .. {src[-1]} ({len(src)} samples)" if len(src) > 1 else src[0]


class NamedCaptureStage(CaptureStage):
    """CaptureStage whose failures name the group (Ray's error would only name the actor)."""

    def process(self, batch: pa.Table) -> pa.Table:
        try:
            out = super().process(batch)
            # which samples this row commits: on a failure the driver names the groups still missing
            return out.append_column("sample_ids", pa.array([json.dumps(batch.column("sample_id").to_pylist())]))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the group's name, as a one-line error
            raise UserError(f"group {group_name(batch)} failed: {type(e).__name__}: {e}; fix or --include "
                            "around the text, or lower --batch-size / --max-length if it ran out of memory") from e


def _stage_kwargs(plan: Plan) -> dict:
    """What every actor gets: the pinned config and what the driver resolved (prompt text, tokenizer)."""
    return dict(cfg=plan.actor_cfg, lake_root=plan.lake.root, layers=plan.layers, hidden_size=plan.info.hidden_size,
                num_layers=plan.info.num_layers, stored=plan.stored, system_prompt=plan.system_prompt,
                tokenizer=plan.tokenizer)


def build_capture(plan: Plan, done: set[str]):
    """The lazy Ray Data pipeline: one block per group of samples -> CaptureStage actor pool."""
    import ray

    cfg = plan.cfg
    return ray.data.from_arrow(groups(plan, done)).map_batches(
        NamedCaptureStage,
        fn_constructor_kwargs=_stage_kwargs(plan),
        batch_size=cfg.group_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
        max_restarts=MAX_TRIES - 1, max_task_retries=MAX_TRIES - 1,  # Ray Data passes them to the actors
    )


def local_capture(plan: Plan, done: set[str]) -> Iterator[pa.Table]:
    """The same stage run in this process, group by group: the executor for a capture that is itself
    one Ray task (e.g. a pruning sweep's variant), where an actor pool per task would oversubscribe."""
    stage = NamedCaptureStage(**_stage_kwargs(plan))
    for group in groups(plan, done):
        yield stage(group)


def run_capture(cfg: CaptureConfig, progress: bool = True, executor: Literal["ray", "local"] = "ray") -> dict:
    """Plan, then capture what is missing, committing each group as its result arrives. `executor`
    "local" runs the stage in this process instead of a Ray Data actor pool (same tables, same commits)."""
    t0 = time.perf_counter()
    plan = plan_capture(cfg)
    if executor == "ray" and (cfg.address or os.environ.get("RAY_ADDRESS")):  # an embedded Ray is one node
        from tourray.runtime import check_lake_placement, init_ray

        init_ray(cfg.address)
        check_lake_placement(plan.lake.root, cfg.lake_shared)  # before the lake is touched
    # one driver per run: a second one would delete the first's fresh rows as orphans (see RunLease)
    lease = RunLease(plan.lake, cfg.run).acquire()
    try:
        return _capture(cfg, plan, lease, t0, progress, executor)
    finally:
        lease.release()


def _capture(cfg: CaptureConfig, plan: Plan, lease: RunLease, t0: float, progress: bool, executor: str) -> dict:
    from tqdm import tqdm

    from tourray.runtime import init_ray, pool_batches

    done = prepare_lake(plan, lease.holder)
    pending = [s for s in plan.samples if s.sample_id not in done]
    summary = dict(run=cfg.run, lake=plan.lake.root, samples=len(plan.samples), already_done=len(plan.samples) - len(pending),
                   captured=0, tokens=0, bytes=0, groups=0, truncated=[], skipped_invalid=plan.skipped)
    log.info("run %s: %d samples, %d already committed, %d to capture (layers %s, sites %s, %s)",
             cfg.run, len(plan.samples), summary["already_done"], len(pending),
             compact_layers(plan.layers), ",".join(s.value for s in cfg.sites), cfg.store_dtype.value)
    if pending:
        t1, committed = time.perf_counter(), set()

        def gave_up(e: BaseException) -> UserError:  # Ray's error after MAX_TRIES of one group
            left = [group_name(g) for g in groups(plan, done | committed)]
            return UserError(f"capture failed after {MAX_TRIES} tries on one of the group(s) not committed: "
                             f"{'; '.join(left[:4])}{' ...' if len(left) > 4 else ''} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})")

        if executor == "local":
            results = local_capture(plan, done)
        else:
            init_ray(cfg.address)
            results = pool_batches(build_capture(plan, done), on_ray_error=gave_up)
        bar = tqdm(total=len(pending), unit="sample", disable=not progress, dynamic_ncols=True)
        try:
            for row in (r for b in results for r in b.to_pylist()):
                frags = json.loads(row["fragments"])
                lease.check()
                for table in COMMIT_ORDER:
                    plan.lake.commit(table, frags.get(table, []))
                summary["groups"] += 1
                committed |= set(json.loads(row["sample_ids"]))
                summary["captured"] += row["n_samples"]
                summary["tokens"] += row["n_tokens"]
                summary["bytes"] += row["bytes"]
                for src in row["truncated"]:
                    log.warning("truncated %s to --max-length %d tokens", src, cfg.max_length)
                summary["truncated"] += list(row["truncated"])
                dt_s = time.perf_counter() - t1
                bar.update(row["n_samples"])
                bar.set_postfix_str(f"{summary['captured'] / dt_s:.2f} samples/s, {summary['tokens'] / dt_s:,.0f} tokens/s")
        finally:
            bar.close()
            results.close()  # after a failure of this loop's own (a commit, the lease): the pool stops now
        summary["capture_seconds"] = round(time.perf_counter() - t1, 2)
        summary["tokens_per_s"] = round(summary["tokens"] / max(summary["capture_seconds"], 1e-9), 1)
    # merge the groups' parts into layer/pair stats, unless this run's merge of exactly these samples
    # finished (decided per run: a capture killed inside the merge has nothing pending when resumed)
    if cfg.stats and (pending or not finalized(plan.lake, cfg.run)):
        lease.check()  # the fence, before the merge's commits
        summary["inline_stats"] = finalize(plan.lake, cfg.run)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    # every group is committed: none of the run's rows is incomplete (the next start reads from here)
    lease.check()  # the fence, before the zone maps' and the summary's commits
    # after the merge, which writes moments and layer/pair stats too: the run's queries skip other runs
    if indexed := plan.lake.index_runs(COMMIT_ORDER + ("layer_stats", "pair_stats")):
        log.info("run %s: zone maps of run brought up to date on %s", cfg.run, ", ".join(indexed))
    record_summary(plan.lake, cfg.run, summary, clean_fragments=clean_marks(plan.lake, len(plan.samples)))
    return summary
