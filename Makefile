# The whole set-up: `make test` (creates .venv, installs, runs the suite) and `make demo`.
# On a GPU box keep your own CUDA torch: `make test TORCH=` skips the CPU wheel when torch is
# already importable in the venv; TORCH="torch==2.5.1" pins another build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all lint demo clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed: keeping $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check code tests bench scripts

demo: $(STAMP)
	cd code && ../$(PY) run_demo.py

clean-demo:
	rm -rf demo_data model/Demo_UGMCL_*
