# fastclip: every target sets itself up; `make train` and `make test` work on a bare machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The local wheels (a CUDA build that also runs on CPU); override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: install train test docs sweep ui report bench bench-lm bench-clip bench-loader bench-step bench-train-flops bench-frontier bench-ddp bench-compress bench-overhead bench-gpu bench-gpu-recipe gpu-kit clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m fastclip.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# the documentation site (docs/, mkdocs.yml) into site/; strict: a broken link or an unlisted page fails
docs: $(STAMP)
	$(PY) -m fastclip.docs_reference
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet  # without the theme's MkDocs 2.0 notice

# A named sweep from sweeps/: make sweep SWEEP=boundary_ablation
SWEEP ?= boundary_ablation
sweep: $(STAMP)
	bash sweeps/$(SWEEP).sh $(ARGS)

# RUN=<run id>: that run's page (a run's last log line gives the command)
ui: $(STAMP)
	$(PY) -m fastclip.ui $(if $(RUN),--run $(RUN)) $(ARGS)

# the latest sweep by default; ARGS="--sweep <parent run id>" or leave a sweep out with a plain python -m
report: $(STAMP)
	$(PY) -m fastclip.report --sweep latest $(ARGS)

bench: bench-lm bench-clip bench-loader bench-step

bench-lm: $(STAMP)
	$(PY) -m fastclip.bench.lm $(ARGS)

bench-clip: $(STAMP)
	$(PY) -m fastclip.bench.clip $(ARGS)

bench-loader: $(STAMP)
	$(PY) -m fastclip.bench.loader $(ARGS)

bench-step: $(STAMP)
	$(PY) -m fastclip.bench.step $(ARGS)

bench-train-flops: $(STAMP)
	$(PY) -m fastclip.bench.train_flops $(ARGS)

bench-frontier: $(STAMP)
	$(PY) -m fastclip.bench.frontier $(ARGS)

bench-ddp: $(STAMP)
	$(PY) -m fastclip.bench.ddp $(ARGS)

bench-compress: $(STAMP)
	$(PY) -m fastclip.bench.compress $(ARGS)

bench-overhead: $(STAMP)
	$(PY) -m fastclip.bench.overhead $(ARGS)

bench-gpu: $(STAMP)
	$(PY) -m fastclip.bench.gpu $(ARGS)

bench-gpu-recipe: $(STAMP)
	$(PY) -m fastclip.bench.gpu_recipe $(ARGS)

# scripts/gpu_check.sh's kit: the wheels the lent GPU machine's image lacks, at this venv's versions, into .whl/
gpu-kit: $(STAMP)
	$(PY) scripts/gpu_kit.py

clean:
	rm -rf outputs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
