# Redis for `make compose-smoke` (deploy/compose/smoke.sh), where no registry image can be pulled:
# Debian bookworm's redis-server on the debootstrap-made base. It stands in for compose.yaml's
# redis:7-alpine and runs compose.yaml's redis command unchanged.
ARG BASE_IMAGE=stemgen-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data \
 && printf '%s\n' '#!/bin/sh' \
      '# Protected mode off, as in the official image: the other containers connect from the network.' \
      'if [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi' \
      'exec "$@"' > /usr/local/bin/redis-entrypoint && chmod +x /usr/local/bin/redis-entrypoint
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["redis-entrypoint"]
CMD ["redis-server"]
