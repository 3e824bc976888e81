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
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
graceful_timeout = 20
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
errorlog = "-"
# Bound what one request can hold the server with.
limit_request_line = 8190
limit_request_fields = 100
