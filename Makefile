# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv with the pinned CPU environment on first use; `make test` also builds
# .venv-py312 (the megatron-core line GPU containers run) and runs the suite on both lines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test env py312-env convert-env clean

env: $(STAMP)

# $(call make_venv,PYTHON,VENV,REQUIREMENTS): torch alone first (a looser spec could pull
# another build), then the pinned requirements, then this package without dependencies.
PIP := -m pip install --quiet --disable-pip-version-check
define make_venv
	$(1) -m venv $(2)
	$(2)/bin/python $(PIP) torch==2.13.0
	$(2)/bin/python $(PIP) -r $(3)
	$(2)/bin/python $(PIP) --no-deps -e .
	touch $(2)/.installed-stamp
endef

$(STAMP): setup.py requirements-cpu.txt
	$(call make_venv,$(PYTHON),$(VENV),requirements-cpu.txt)

# The second line: Python 3.12 (pyenv's on these machines), torch==2.13.0 (the registry's CUDA
# build: 527 MB plus NVIDIA libraries, 5.6 GB in all; it runs on a CPU) and the megatron-core
# release NGC PyTorch containers resolve to. `--megatron-line` runs every test that touches
# megatron-core; `--megatron-free` the few that do not, with megatron made unimportable
# (tests/conftest.py).
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
PY312_VENV := .venv-py312
PY312 := $(PY312_VENV)/bin/python
PY312_STAMP := $(PY312_VENV)/.installed-stamp

py312-env: $(PY312_STAMP)

$(PY312_STAMP): setup.py requirements-py312.txt
	$(call make_venv,$(PYTHON312),$(PY312_VENV),requirements-py312.txt)

demo: $(STAMP)
	$(PY) -m ov2_megatron.demo

test: $(STAMP) $(PY312_STAMP) convert-env
	$(PY) -m pytest --megatron-free
	$(PY) -m pytest --megatron-line
	$(PY312) -m pytest --megatron-line

# The conversion tests load exported checkpoints with the real timm / transformers / open_clip,
# which need torchvision: it cannot share .venv's torch, so they get their own venv (tests
# skip, saying why, where it is missing).
CONVERT_VENV := .venv-convert
CONVERT_PY := $(CONVERT_VENV)/bin/python
CONVERT_STAMP := $(CONVERT_VENV)/.installed-stamp
CONVERT_REQS := tests/conversion/requirements-convert.txt

convert-env: $(CONVERT_STAMP)

$(CONVERT_STAMP): $(CONVERT_REQS)
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_PY) $(PIP) torch==2.14.1 torchvision==0.29.1
	$(CONVERT_PY) $(PIP) -r $(CONVERT_REQS)
	touch $(CONVERT_STAMP)

clean:
	rm -rf $(VENV) $(PY312_VENV) $(CONVERT_VENV) runs .pytest_cache

# The wheels tools/gpu_check.sh installs on a GPU box without network (CPython 3.12,
# manylinux x86_64; git-ignored), pinned in tools/gpu_wheels.txt. Needs network here.
GPU_WHEELS := tools/wheels
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) -r tools/gpu_wheels.txt
	bash tools/gpu_check.sh --dry-run
