"""gunicorn settings for the gateway (``gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'``).

The gateway only validates and enqueues, so a few sync workers with threads serve many requests;
the values come from the environment so a deployment can size them.
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", max(2, multiprocessing.cpu_count())))
threads = int(os.environ.get("GUNICORN_THREADS", 4))
worker_class = "gthread"
# Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections over the
# workers. On one shared socket, a gthread worker accepts every connection it can (up to
# worker_connections): under keep-alive load one worker, one core under the GIL, took all of them
# while the others idled (bench.gateway, 2 workers: 100 % / 0 % CPU).
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "true").lower() in ("1", "true", "yes")
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
graceful_timeout = 20
keepalive = 5
# "-": stdout; empty: no access log.
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-") or None
errorlog = "-"
# Bound what one request can hold the server with.
limit_request_line = 8190
limit_request_fields = 100
