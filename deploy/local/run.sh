#!/usr/bin/env bash
# `make run`: the whole local stack in the foreground. Redis and Azurite are started when not
# running, one Celery worker runs in the background, the gateway (gunicorn) in the foreground on
# http://127.0.0.1:8000. Ctrl-C stops the worker and the gateway.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/services.sh
# make run's own Redis (job store, outbox, broker) with the durable configuration: every write is
# fsynced before it is answered (deploy/local/redis-durable.conf). The shared Redis on 6379 that
# services.sh starts has no persistence: it is for tests. Data: var/redis.
REDIS_PORT="${STEMGEN_REDIS_PORT:-6380}"
if ! (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then
  echo "run: starting durable redis on port $REDIS_PORT (data in var/redis)" >&2
  mkdir -p var/redis
  # A copy: CONFIG REWRITE rewrites the file Redis was started with.
  cp deploy/local/redis-durable.conf var/redis/redis.conf
  redis-server var/redis/redis.conf --port "$REDIS_PORT" --bind 127.0.0.1 \
    --dir "$(pwd)/var/redis" --daemonize yes --logfile "$(pwd)/var/redis/redis.log"
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break; sleep 0.2; done
fi
# The environment, then .env, win over these defaults (stemgen_settings reads both).
for pair in "BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0" "RESULT_BACKEND=redis://127.0.0.1:$REDIS_PORT/1"; do
  name="${pair%%=*}"
  if [ -z "${!name:-}" ] && ! grep -qs "^$name=" .env; then export "$pair"; fi
done
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
