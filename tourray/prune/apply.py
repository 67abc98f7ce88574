"""`tourray prune apply`: a plan + the model -> a standard HF checkpoint without the planned blocks,
optionally with the linear patch of each removed span folded into the block before it."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Literal

from pydantic import Field

from tourray.lake import tables as lk
from tourray.config import BaseConfig, StorageOptions, storage_options_field
from tourray.errors import UserError
from tourray.prune.plan import read_plan, spans

log = logging.getLogger("tourray")


class ApplyConfig(BaseConfig):
    """`tourray prune apply`: every field is a flag."""

    model: str = Field(description="The unpruned checkpoint folder (or hub id) the plan was made for.")
    plan: str = Field(description="Plan JSON from `tourray prune plan`.")
    out: str = Field(description="Checkpoint folder to write (new or empty).")
    patch: Literal["none", "lstsq", "cosine"] = Field("none", description="Linear patch per removed span (ReplaceMe), solved from the plan's run: none, lstsq (closed form), cosine (lstsq then Adam on cosine distance).")
    lake: str | None = Field(None, description="Lake holding the run the patch is solved from; default: the plan's.")
    storage_options: StorageOptions = storage_options_field()
    run: str | None = Field(None, description="Run the patch is solved from; default: the plan's (the unpruned model's capture, with resid_mid).")
    ridge: float = Field(0.0, ge=0, description="Ridge of the least-squares patch toward the identity (the block unpatched), in units of the MLP output's mean second moment per channel; 0 = plain least squares.")
    epochs: int = Field(3, gt=0, description="Adam epochs over the lake for --patch cosine.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate for --patch cosine.")


def run_apply(cfg: ApplyConfig) -> dict:
    """Check everything, solve the patches (if any), then prune and write the checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tourray.model.identity import model_revision
    from tourray.surgery.blocks import check_out, fold_embedding_patch, fold_mlp_patch, remove_blocks, write_checkpoint

    t0 = time.perf_counter()
    check_out(cfg.out)  # refuse a non-empty --out before the slow work
    try:
        num_layers = AutoConfig.from_pretrained(cfg.model).get_text_config().num_hidden_layers
    except (OSError, ValueError) as e:
        raise UserError(f"--model {cfg.model}: not a checkpoint ({str(e).splitlines()[0]})") from None
    plan = read_plan(cfg.plan, num_layers)
    if plan.get("num_layers") not in (None, num_layers):
        raise UserError(f"--plan {cfg.plan} is for a model of {plan['num_layers']} blocks; --model {cfg.model} has {num_layers}")
    revision = model_revision(cfg.model, None)
    same_model = plan.get("model_revision") in (None, revision)
    fits = []
    if cfg.patch != "none":
        from tourray.prune.patch import check_patchable, solve_span

        if not same_model:
            raise UserError(f"--patch: the plan's run {plan.get('run')} captured a model of revision {plan['model_revision']}, "
                            f"but --model {cfg.model} is {revision}; the patch must be solved from this model's activations")
        if not (cfg.lake or plan.get("lake")) or not (cfg.run or plan.get("run")):
            raise UserError(f"--patch: --plan {cfg.plan} names no lake/run to solve the patch from; give --lake and --run")
        lake, run = lk.Lake(cfg.lake or plan["lake"], cfg.storage_options), cfg.run or plan["run"]
        check_patchable(lake, run, spans(plan["removed"]))
        fits = [solve_span(lake, run, a, b, cfg.ridge, cfg.patch, cfg.epochs, cfg.lr) for a, b in spans(plan["removed"])]
    elif not same_model:
        log.warning("the plan was made from a capture of another model revision (%s; --model is %s)",
                    plan.get("model_revision"), revision)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    for f in fits:  # fold first, in the original numbering, then delete
        (fold_embedding_patch(model, f.matrix) if f.fold_into < 0 else fold_mlp_patch(model, f.fold_into, f.matrix))
    remove_blocks(model, plan["removed"])
    provenance = dict(
        source_model=cfg.model, source_revision=revision, removed=plan["removed"], num_layers_before=num_layers,
        num_layers_after=num_layers - len(plan["removed"]), plan={k: plan.get(k) for k in (
            "method", "remove", "seed", "protect", "lake", "run", "table_versions", "created_at", "tourray_commit")},
        patch=cfg.patch, patches=[dict(first=f.first, last=f.last, fold_into="embedding" if f.fold_into < 0 else f.fold_into,
                                       tokens=f.tokens, **f.diagnostics) for f in fits],
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
    )
    out = write_checkpoint(model, cfg.model, cfg.out, provenance)
    params = sum(p.numel() for p in model.parameters())
    log.info("pruned %s: removed blocks %s (%s), patch %s -> %s (%d blocks, %.1fM parameters) in %.1f s", cfg.model,
             plan["removed"], plan.get("method"), cfg.patch, out, num_layers - len(plan["removed"]), params / 1e6,
             time.perf_counter() - t0)
    return dict(out=str(out), removed=plan["removed"], patches=provenance["patches"], parameters=params,
                num_layers=num_layers - len(plan["removed"]))
