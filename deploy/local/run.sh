#!/usr/bin/env bash
# `make run`: the whole local stack in the foreground. Redis and Azurite are started when not
# running, one Celery worker runs in the background, the gateway (gunicorn) in the foreground on
# http://127.0.0.1:8000. Ctrl-C stops the worker and the gateway.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/services.sh
export USER="${USER:-stemgen}"
# Local development: callbacks to a receiver on this machine are fine (production default: refused).
export CALLBACK_ALLOW_LOOPBACK="${CALLBACK_ALLOW_LOOPBACK:-true}"
VENV=.venv/bin
mkdir -p var

"$VENV/celery" -A tasks.app worker -Q stems,callbacks \
  --loglevel "${LOG_LEVEL:-INFO}" --hostname "stemgen-local@%h" &
WORKER=$!
trap 'kill -TERM $WORKER 2>/dev/null; wait $WORKER 2>/dev/null' EXIT INT TERM

echo "stemgen: gateway on http://127.0.0.1:${PORT:-8000} (model ${MUSICGEN_MODEL:-facebook/musicgen-small})" >&2
"$VENV/gunicorn" -c deploy/gunicorn.conf.py --bind "127.0.0.1:${PORT:-8000}" 'api:create_app()'
