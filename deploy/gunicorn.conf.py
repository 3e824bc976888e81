"""gunicorn settings for the gateway (``gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'``).

The gateway validates a request, writes one Redis script and answers (tasks.service), so it is
I/O-bound and short: one gevent worker per core serves many keep-alive connections. Measured with
``make bench-gateway`` on the 2-core box (docs/benchmarks.md, "Gateway"): gevent 2 workers
1160-1240 accepted req/s against gthread 2 x 4 threads 710-840 (and a p99 above a second in some
gthread runs). The
values come from the environment so a deployment can size them; ``GUNICORN_WORKER_CLASS=gthread``
still works (``GUNICORN_THREADS`` sizes it).
"""

import gc
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

from gunicorn.glogging import Logger as _GunicornLogger

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", max(2, multiprocessing.cpu_count())))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", 1000))
threads = int(os.environ.get("GUNICORN_THREADS", 4))
# Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections over the
# workers. On one shared socket, a worker accepts every connection it can (up to
# worker_connections): under keep-alive load one worker, one core under the GIL, took all of them
# while the others idled (bench.gateway, 2 gthread workers: 100 % / 0 % CPU).
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "true").lower() in ("1", "true", "yes")
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
graceful_timeout = 20
keepalive = 5
# Off by default: at a thousand requests a second the ingress (load balancer, reverse proxy) is
# the place for request logs; it cost the gateway ~10 % of its throughput (docs/benchmarks.md,
# "Gateway").
# "-": stdout; a path: that file.
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "") or None
errorlog = "-"
# After a worker has loaded the app, gc.freeze() moves what it holds (~92 000 objects: Flask,
# pydantic, Celery, kombu, redis) to the permanent generation, so a full collection scans only what
# requests created since. Without it each worker paused 60-94 ms per full collection, 7-8 times in
# 20 s of load, and those pauses set the p99 (docs/benchmarks.md, "Gateway"). See the gc module's
# documentation of gc.freeze.
gc_freeze = os.environ.get("GUNICORN_GC_FREEZE", "true").lower() in ("1", "true", "yes")
# Bound what one request can hold the server with.
limit_request_line = 8190
limit_request_fields = 100


def post_request(worker, req, environ, resp):
    """On a gevent worker, give the other connections a turn after each request.

    A keep-alive connection whose next request has already arrived is read without blocking, so its
    greenlet never yields to the hub between requests and one busy client can hold the worker while
    the others wait. Measured (bench.gateway, 32 connections): no yield p90 230-310 ms, p99
    810-970 ms; gevent.sleep(0) p99 89-118 ms, p99.9 320-630 ms; gevent.idle() p99 53-63 ms,
    p99.9 92-97 ms.
    """
    if worker.__class__.__name__ == "GeventWorker":
        import gevent

        gevent.idle()  # back once the loop has run every ready connection once


def post_worker_init(worker):
    """Freeze the loaded app's objects out of the garbage collector's reach (``gc_freeze``)."""
    if gc_freeze:
        gc.freeze()


class StemgenLogger(_GunicornLogger):
    """gunicorn's logger, with its lines and the app's in LOG_FORMAT (text or JSON), the request's
    job context and secrets masked (stemgen_logging): the app's loggers propagate to one root
    handler on stderr; gunicorn's own handlers (error log, access log) get the same format."""

    def setup(self, cfg):
        super().setup(cfg)
        import stemgen_logging
        from stemgen_settings import load_settings

        stemgen_logging.configure_logging(load_settings(), "gateway",
                                          loggers=(self.error_log, self.access_log))


logger_class = StemgenLogger

#: Set when the multiprocess metrics directory is ours (made in on_starting, removed in on_exit).
_made_metrics_dir = None


def on_starting(server):
    """Prometheus metrics across the workers (prometheus_client's multiprocess mode, api.metrics):
    each worker writes its samples under PROMETHEUS_MULTIPROC_DIR and /metrics adds them up. It
    must be set before the workers import prometheus_client and be empty at start: a fresh
    directory when unset, else its old *.db files are removed. (With ``preload_app`` the app, and
    prometheus_client, would be loaded before this hook: not supported.)"""
    global _made_metrics_dir
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink()
    else:
        path = _made_metrics_dir = tempfile.mkdtemp(prefix="stemgen-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def child_exit(server, worker):
    """A worker that exited leaves its counters to the sum; its live gauges go."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _made_metrics_dir:
        shutil.rmtree(_made_metrics_dir, ignore_errors=True)
