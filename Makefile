# `make demo` and `make test` create or refresh .venv themselves; nothing installed by hand is relied on.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are the newest on this machine's disk (a CUDA build, so the CUDA
# sources compile and link here even without a GPU); override on other machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
MAX_JOBS ?= 2
PYTEST_ARGS ?=
export CUDA_HOME MAX_JOBS

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) csrc/build.json

.PHONY: venv build test lint demo bench cmake clean

venv: $(VENV)/.stamp-install

$(VENV)/.stamp-install: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) triton ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@ $(VENV)/.stamp-build

# Rebuild the extension in place when a C++/CUDA source changes (ninja recompiles only what changed).
$(VENV)/.stamp-build: $(VENV)/.stamp-install $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(VENV)/.stamp-build

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: build lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: bundled demo data, a one-stage training run of the tiny preset, then chat on held-out images.
# The kernel-only runs stay available as `sphinx-x tiles` and `sphinx-x kernels`.
demo: build
	rm -rf build/demo
	$(VENV)/bin/sphinx-x make-demo-data build/demo
	$(VENV)/bin/sphinx-x train --config configs/demo.yaml
	@echo "three held-out questions (expected: blue, green, red):"
	$(VENV)/bin/sphinx-x chat --checkpoint build/demo/run --image build/demo/images/showcase_0.png "What colour is the square?"
	$(VENV)/bin/sphinx-x chat --checkpoint build/demo/run --image build/demo/images/showcase_1.png "What colour is the triangle?"
	$(VENV)/bin/sphinx-x chat --checkpoint build/demo/run --image build/demo/images/showcase_2.png "What colour is the triangle?"

bench: build
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
	$(PY) benchmarks/report.py

# The standalone CMake build of the same sources (csrc/build.json) into build/cmake.
cmake: venv
	$(VENV)/bin/cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
		$(if $(CUDA_HOME),-DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc,-DSPHINX_KERNELS_CUDA=OFF)
	$(VENV)/bin/cmake --build build/cmake -j $(MAX_JOBS)

clean:
	rm -rf build sphinx_kernels/_C*.so $(VENV)/.stamp-build
