# `make demo` and `make test` work on a fresh machine with nothing but Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-demo

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[export,calibrate,dicom,igtl,batch,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sonoscore demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf out/demo
