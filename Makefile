# flashserve: local development on the CPU. `make help` lists the targets.
# transformers 5 needs Python >= 3.11; the serving image runs 3.11 too.
PYTHON ?= $(or $(shell command -v python3.11),python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q
PORT ?= 8080
# Request body for `make predict`, e.g. D='{"model":"m","messages":[{"role":"user","content":"Hi"}]}'
D ?= {"model": "flashserve", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}
# Extra arguments for `make serve`, e.g. SERVE_ARGS='--set max_num_seqs=8'
SERVE_ARGS ?=
# packages/ is what the serving image puts on sys.path.
export PYTHONPATH := $(CURDIR)/packages$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup serve predict test lint embedded-model

help:
	@echo "make setup            create $(VENV) ($(PYTHON)) and install requirements-local.txt"
	@echo "make serve            serve the embedded model with the real Truss server on :$(PORT)"
	@echo "make predict D='{..}' POST a chat request to the local server"
	@echo "make test             run the test-suite"
	@echo "make lint             ruff check"
	@echo "make embedded-model   regenerate data/embedded_model"

setup: $(VENV)/.installed

# The stamp is newer than requirements-local.txt once everything in it is installed.
$(VENV)/.installed: requirements-local.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-local.txt
	touch $@

serve: setup
	$(PY) -m flashserve.serve --port $(PORT) $(SERVE_ARGS)

predict:
	$(PY) -m flashserve.predict --url http://127.0.0.1:$(PORT) -d '$(D)'

test: setup
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

embedded-model:
	$(PY) scripts/make_embedded_model.py --out data/embedded_model
