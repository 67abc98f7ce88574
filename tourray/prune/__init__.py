"""Depth pruning from lake evidence: plans (`plan`), the linear patch (`patch`), `apply` (writes the checkpoint
through tourray.surgery), width plans (`width`), evaluation against the unpruned model (`evaluate`,
`verdict`), the sweep (`sweep`) and its report."""

from tourray.prune.apply import ApplyConfig, run_apply
from tourray.prune.plan import BLIND, EVIDENCE, METHODS, PlanConfig, make_plan, read_plan, spans, write_plan

__all__ = ["ApplyConfig", "BLIND", "EVIDENCE", "METHODS", "PlanConfig", "make_plan", "read_plan", "run_apply",
           "spans", "write_plan"]
