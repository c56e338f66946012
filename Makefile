# ism-edge: the two set-up commands are `make demo` (the main job, CPU) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Optional extra index for torch on machines whose default index serves a CUDA build,
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: test demo lint typecheck clean install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_EXTRA) "torch==2.13.0"
	$(PIP) install -q $(PIP_EXTRA) -e ".[train,eval,video,dev]"
	# Type stubs for the TensorRT builder module; --no-deps because the stubs'
	# dependency on tensorrt itself cannot be installed without NVIDIA's index.
	$(PIP) install -q --no-deps "tensorrt-stubs>=10,<11"
	# onnx2torch (train --classifier model.onnx) without its torchvision requirement (pyproject: train).
	$(PIP) install -q --no-deps "onnx2torch>=1.5,<2"
	touch $@

install: $(VENV)/.installed

typecheck: $(VENV)/.installed
	# ism_edge_engines.typecheck repairs tensorrt-stubs so mypy really checks every TensorRT call.
	$(PY) -m ism_edge_engines.typecheck engines/tensorrt_build.py ism_edge/backends/tensorrt ism_edge/cuda.py
	# The whole runtime package (what a Jetson installs).
	$(PY) -m mypy ism_edge

lint: $(VENV)/.installed
	# pyproject's [tool.ruff]: 120 columns, and ism_edge may not import torch, ism_edge_training or ism_edge_engines.
	$(PY) -m ruff check ism_edge training engines cli tests examples scripts

test: $(VENV)/.installed
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache
