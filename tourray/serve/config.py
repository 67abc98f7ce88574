"""Configs of `tourray serve` and `tourray tours generate`; every field is also a flag (a nested
`decoding:` section gives `--decoding-repetition-penalty` etc.)."""

from __future__ import annotations

from pydantic import Field, field_validator

from tourray.config import CommaList, BaseConfig, Engine, StorageOptions, storage_options_field
from tourray.model.decoding import TourDecoding
from tourray.serve.prompt import STYLES

SYSTEM_PROMPT = "samples/system_prompt.md"


class ServeConfig(BaseConfig):
    """`tourray serve`: the page and API over one model, or two side by side."""

    model: str = Field(description="Checkpoint folder of the model to serve (the compressed one, with --compare).")
    compare: str | None = Field(None, description="Checkpoint folder of a second model answering beside it (the original): the page shows both with their time to first token, tokens/s and parameter counts.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    system_prompt: str | None = Field(SYSTEM_PROMPT, description="File holding the tour guide's system prompt (the corpus's); none: no system prompt.")
    chat_template: bool = Field(True, description="Use the tokenizer's chat template when it has one; else the plain '<system>\\n\\n<prompt>\\n' format.")
    decoding: TourDecoding = Field(default_factory=TourDecoding, description="Default decoding of every answer (a request may override it).")
    examples: str | None = Field(None, description="JSON of pre-generated examples (tourray tours examples); default: the one shipped in the package.")
    replicas: int = Field(1, ge=1, description="Ray Serve replicas per model (each holds one copy of the model).")
    cpus_per_replica: float = Field(0.5, gt=0, description="CPUs Ray reserves per model replica; fractional so two models fit on 2 cores.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per replica; default: the cores divided among every model replica (on a busy 2-core VM two threads per replica ran 5-10x slower than one: OpenMP threads spin against each other).")
    max_batch_size: int = Field(4, ge=1, description="Non-streamed requests that arrive together (same max_new_tokens and decoding) share one batched generate, up to this many; streamed ones run alone.")
    batch_wait_ms: float = Field(20.0, ge=0, description="How long a non-streamed request waits for others to batch with.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a model replica accepts at once (Ray Serve queues the rest).")
    stop_radius_km: float = Field(0.5, gt=0, description="A pin within this distance of a corpus stop is told about that stop by name.")
    in_process: bool = Field(False, description="Run the app with uvicorn in this process, without Ray Serve (one copy per model; for a laptop or debugging).")
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else an embedded local Ray.")

    def replica_threads(self) -> int:
        """`threads`, or this machine's cores shared among every replica of every model."""
        import os

        models = 1 + (self.compare is not None)
        return self.threads or max(1, (os.cpu_count() or 1) // (models * self.replicas))


class ToursConfig(BaseConfig):
    """`tourray tours generate`: teacher-written tours for (place, tags, style) inputs, into the lake."""

    model: str = Field(description="Checkpoint folder (or hub id) of the teacher that writes the tours.")
    run: str = Field("tours", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Name of this set of tours in the lake; re-running a name adds only what is missing.")
    lake: str = Field("lake", description="Lake root: a local folder or a Lance URI (s3://...).")
    places: str | None = Field(None, description="Places table (TSV, tourray/corpus/places.tsv's columns); default: the corpus's.")
    include: CommaList[str] = Field(["train/*"], description="Only stops whose corpus path matches one of these globs (default: the training stops; eval stops stay unseen); comma-separated.")
    tags: str | None = Field(None, description="Tag list file: one tag set per line, comma-separated (e.g. history,people); default: a built-in list of single interests and pairs.")
    styles: CommaList[str] = Field(["brief", "stimulate", "detailed"], description="Styles to write; comma-separated.")
    n: int = Field(0, ge=0, description="Inputs to write, drawn (seeded by --seed) from every place x tag set x style; 0 = all of them.")
    seed: int = Field(0, ge=0, description="Seed of the draw of --n inputs (each tour's sampling seed, when sampling, is derived from it and the input).")
    max_new_tokens: int | None = Field(None, ge=1, le=1024, description="Most new tokens per tour; default: the style's (brief 80, stimulate 120, detailed 240).")
    decoding: TourDecoding = Field(default_factory=TourDecoding, description="Decoding of the teacher.")
    system_prompt: str | None = Field(SYSTEM_PROMPT, description="File holding the system prompt (the corpus's tour guide).")
    chat_template: bool = Field(True, description="Use the tokenizer's chat template when it has one.")
    engine: Engine = Field(Engine.hf, description="hf (transformers generate, batched, on CPU or GPU) or vllm (LLM.generate; pip install 'tourray[vllm]').")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (left-padded).")
    group_size: int = Field(16, gt=0, description="Tours per atomic commit: the unit a killed run loses.")
    actors: int = Field(1, gt=0, description="Most model actors (each holds one copy of the model).")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs Ray reserves per actor; fractional so 2 cores do not deadlock.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor; 0 runs on CPU.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cores / actors.")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM: fraction of each GPU it may take.")
    vllm_max_model_len: int = Field(2048, gt=16, description="vLLM: longest prompt + tour, in tokens.")
    export: str | None = Field(None, description="Also write the run's tours as training texts into this folder: one .txt per tour and an index.tsv capture reads (never inside samples/eval).")
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else an embedded local Ray.")
    storage_options: StorageOptions = storage_options_field()


    @field_validator("styles")
    @classmethod
    def _known_styles(cls, v):
        unknown = [s for s in v if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown style(s) {', '.join(map(repr, unknown))}; known: {', '.join(STYLES)}")
        if not v:
            raise ValueError("at least one style")
        return list(dict.fromkeys(v))
