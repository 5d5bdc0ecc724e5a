# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv with the pinned CPU environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test env convert-env clean

env: $(STAMP)

$(STAMP): setup.py requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ov2_megatron.demo

test: $(STAMP) convert-env
	$(PY) -m pytest

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
	$(CONVERT_PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(CONVERT_PY) -m pip install --quiet --disable-pip-version-check -r $(CONVERT_REQS)
	touch $(CONVERT_STAMP)

clean:
	rm -rf $(VENV) $(CONVERT_VENV) runs .pytest_cache
