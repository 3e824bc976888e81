#!/usr/bin/env bash
# Start the local backing services when they are not already up (idempotent):
#   Redis 127.0.0.1:6379, Azurite (blob) 127.0.0.1:10000, and with --rabbitmq RabbitMQ 127.0.0.1:5672.
# Azurite comes from the npm registry into .tools/ (see `make install`).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
VAR="$ROOT/var"
mkdir -p "$VAR"

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port name seconds
  for _ in $(seq 1 $(( $3 * 5 ))); do up "$1" && return 0; sleep 0.2; done
  echo "services: $2 did not come up on port $1" >&2; return 1
}

if ! up 6379; then
  echo "services: starting redis" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile "$VAR/redis.log"
  wait_for 6379 redis 20
fi

if ! up 10000; then
  AZURITE="$ROOT/.tools/node_modules/.bin/azurite-blob"
  if [ ! -x "$AZURITE" ]; then
    echo "services: azurite is not installed; run 'make install'" >&2; exit 1
  fi
  echo "services: starting azurite" >&2
  mkdir -p "$VAR/azurite"
  setsid nohup "$AZURITE" --silent --location "$VAR/azurite" --blobHost 127.0.0.1 --blobPort 10000 \
    --skipApiVersionCheck --loose >"$VAR/azurite.log" 2>&1 < /dev/null &
  wait_for 10000 azurite 30
fi

if [ "${1:-}" = "--rabbitmq" ] && ! up 5672; then
  echo "services: starting rabbitmq" >&2
  rabbitmq-server -detached
  wait_for 5672 rabbitmq 90
fi
