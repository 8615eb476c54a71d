# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-scale gpu-check clean

install: $(STAMP)

# Re-install only when the project's requirements change.
$(STAMP): pyproject.toml
	@echo "install: $(VENV)/ with the project and its dev, cluster extras (about 5 min the first time; pip's progress follows)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install --progress-bar on -e ".[dev,cluster]"
	@touch $(STAMP)

# The whole pipeline on the embedded default (scikit-learn digits), offline, on CPU.
demo: install
	$(PY) scripts/demo.py

# loadgroup: tests/conftest.py groups each file's tests on one worker (as loadfile did) and hands the
# long `slow` runs out first, one at a time, so that the two workers finish together.
# --max-worker-restart=0: a worker that crashes (a segfault) ends the run as a failure at once; a
# replaced worker once left xdist's loadgroup scheduler waiting until CI's limit.
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --max-worker-restart=0

# Every benchmark at a size a laptop finishes; bench_scale's paper-scale run (hours on 2 CPU
# cores) is `make bench-scale`.
bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; \
	  if [ "$$b" = benchmarks/bench_scale.py ]; then $(PY) $$b --quick || exit 1; else $(PY) $$b || exit 1; fi; done

bench-scale: install
	$(PY) benchmarks/bench_scale.py

# The whole pipeline on one GPU (≤ 8 min): throughput, stage times and ratios -> gpu_check.json.
# Refuses (exit 2) on a machine without CUDA.
gpu-check: install
	$(PY) scripts/gpu_check.py --json gpu_check.json

clean:
	rm -rf runs multirun/*/ outputs wandb .pytest_cache
