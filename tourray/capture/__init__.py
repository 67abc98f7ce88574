"""Capture: teacher-forced forward passes with hooks on every decoder block, written to the lake.

One module per part: `config` (CaptureConfig and the engine sub-configs), `engine` (the engine
protocol and the maths every engine shares), `hf` / `vllm` (the engines), `actor` (the Ray Data
stage that builds the engine and writes fragments inside the actor), `plan` (checks and lake preparation before any
work), `driver` (the pipeline and the commits).
"""

from tourray.capture.config import CaptureConfig
from tourray.capture.driver import build_capture, local_capture, run_capture
from tourray.capture.engine import INNER_SITES, Captured, Engine, kl_divergence, surprisal_entropy
from tourray.capture.plan import Plan, plan_capture, prepare_lake
from tourray.capture.actor import COMMIT_ORDER, CaptureStage, make_engine

__all__ = ["CaptureConfig", "CaptureStage", "Captured", "COMMIT_ORDER", "Engine", "INNER_SITES", "Plan",
           "build_capture", "kl_divergence", "local_capture", "make_engine", "plan_capture",
           "prepare_lake", "run_capture", "surprisal_entropy"]
