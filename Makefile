# Every target sets up .venv on first use (python3 -m venv + pip install -e),
# so a fresh clone needs nothing but python3 and make.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(1)

.PHONY: test bench bench-store bench-grpc bench-cuda bench-torch demo serve proto golden clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(call STAMP,test): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(call STAMP,serve): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(call STAMP,bench): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

$(call STAMP,demo): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

## test: install the project with its test extras and run the whole suite; the CUDA
## kernels run under numba's CUDA simulator in a second process (no GPU needed)
test: $(call STAMP,test)
	$(PY) -m pytest
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cuda

## serve: install the project and run the gRPC server on 127.0.0.1:50051, sqlite store in ./.normsvc/
serve: $(call STAMP,serve)
	$(VENV)/bin/normsvc serve --host 127.0.0.1 --port 50051 --store sqlite:///.normsvc/stats.db

## bench: compare the CPU kernels with PyTorch, numpy and a plain copy, once with torch imported first and once
## with normsvc first (fresh processes); per case the worse torch/normsvc ratio
bench: $(call STAMP,bench)
	$(PY) bench/kernels.py

## bench-store: running-statistics updates per second against a bare SQLite write
bench-store: $(call STAMP,bench)
	$(PY) bench/store.py

## bench-grpc: the gRPC service against a bare gRPC echo of the same payload
bench-grpc: $(call STAMP,bench)
	$(PY) bench/rpc.py

## bench-torch: normsvc.torch on ResNet-50's 53 BatchNorms: the training thread's time per step in shared
## mode, and sync mode's reduction round per layer against a gloo all_reduce of the same bytes
bench-torch: $(call STAMP,bench)
	$(PY) bench/torch_sync.py

## bench-cuda: the CUDA kernels against torch and a device copy (needs an NVIDIA GPU and the cuda extra)
bench-cuda: $(call STAMP,bench)
	$(PY) bench/cuda.py

## demo: a local server (sqlite in a temp dir) and 4 PyTorch trainers with different data sharing BatchNorm
## statistics (shared mode, then sync mode): progress, a table against the true statistics, frozen
## inference, docs/demo.png
demo: $(call STAMP,demo)
	$(PY) examples/torch_demo.py

## proto: regenerate normsvc/_proto/ from protos/ (the committed stubs; a test checks they match)
proto: $(call STAMP,test)
	$(PY) scripts/gen_proto.py

## golden: regenerate tests/golden/ from Keras 3, PyTorch and tf_keras 2.21 in their own venv (.venv-golden)
golden:
	$(PYTHON) -m venv .venv-golden
	.venv-golden/bin/pip install -q torch==2.13.0 'keras>=3.15,<4' 'tensorflow-cpu>=2.21,<2.22' 'tf_keras>=2.21,<2.22' numpy
	KERAS_BACKEND=torch .venv-golden/bin/python scripts/make_golden.py
	.venv-golden/bin/python scripts/make_golden_tf_keras.py

clean:
	rm -rf $(VENV) .venv-golden build *.egg-info .pytest_cache .hypothesis
