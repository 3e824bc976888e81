# stemgen — the two commands: `make run` (local stack) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.stemgen-installed
AZURITE := .tools/node_modules/.bin/azurite-blob
AZURITE_VERSION := 3.37.0
export USER ?= stemgen

.PHONY: install run test test-unit test-integration services bench bench-gateway bench-tempo bench-key faults lock clean

install: $(STAMP) $(AZURITE)

# Idempotent: re-runs only when the dependency lists change (or the venv is missing).
$(STAMP): setup.cfg pyproject.toml requirements/audiocraft.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(UV) pip install --python $(PY) -r requirements/audiocraft.txt -c requirements/constraints.txt
	# audiocraft's own pins (torch 2.1, xformers<0.0.23) do not install here; its code runs on the above.
	$(UV) pip install --python $(PY) --no-deps audiocraft==1.3.0
	$(UV) pip install --python $(PY) -e '.[dev,bench,monitor]' -c requirements/constraints.txt
	$(PY) -c "import audiocraft.models, stems.engine, api, tasks.app"
	# Fills librosa's on-disk numba cache (20-30 s, once) so that no worker start compiles it.
	$(PY) -c "from stems.render import warm_up; warm_up()"
	touch $(STAMP)

$(AZURITE):
	mkdir -p .tools
	npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

services: install
	bash deploy/local/services.sh

run: install
	bash deploy/local/run.sh

test: install
	bash deploy/local/services.sh --rabbitmq
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Fault injection on real parts (tests/faults, ~7 min): worker SIGKILL, Redis restart, callback
# endpoint and Azurite outages, schemathesis fuzzing; prints a lost/duplicated summary table.
faults: install
	bash deploy/local/services.sh --rabbitmq
	$(PY) -m pytest -ra tests/faults $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -ra -m "not integration" $(PYTEST_ARGS)

bench: install services
	$(PY) -m bench.throughput $(BENCH_ARGS)

bench-gateway: install services
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench.gateway $(BENCH_ARGS)

bench-tempo: install
	bash bench/tempo/prepare.sh
	$(PY) -m bench.tempo $(BENCH_ARGS)

# Key estimation and chord fit on a synthetic set (24 keys x timbres x progressions); --strict
# fails below 95 % exact key accuracy.
bench-key: install
	$(PY) -m bench.key $(BENCH_ARGS)

# Regenerate the pinned versions after changing a dependency list.
lock:
	$(UV) pip freeze --python $(PY) --exclude-editable | grep -v '^audiocraft==' > requirements/constraints.txt

clean:
	rm -rf $(VENV) .tools var .pytest_cache
