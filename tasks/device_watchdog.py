"""A worker whose generation call outlived its deadline (stems.batching's watchdog).

A thread hung in a device call (a CUDA kernel that never returns, a wedged driver) cannot be
stopped from Python. The batcher fails the hung call's stems and everything queued behind it with
``GenerationTimeout``; then ``generation_hung``:

1. marks the worker not ready: ``stemgen_info`` (``GET /health``) reports ``ready: false`` with the
   reason, the ready file goes and the gauge ``stemgen_worker_ready`` drops to 0
   (tasks.readiness);
2. asks Celery for a warm shutdown with exit code EXIT_HUNG (``celery.worker.state.should_stop``,
   as a SIGTERM would, but not 0): the running tasks finish (their stems already failed), the
   prefetched unacknowledged messages go back to the queue for other workers;
3. once the worker has shut down (``worker_shutdown``), ends the process with EXIT_HUNG without
   waiting for the hung thread, so that the orchestrator (Kubernetes, compose ``restart``)
   starts a fresh one.
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_shutdown
from celery.worker import state as worker_state

from tasks import readiness as ready_flag

log = logging.getLogger(__name__)

#: The exit status of a worker stopped by a hung generation (EX_SOFTWARE: an internal error).
EXIT_HUNG = 70

#: Why this worker is not ready (None: it is).
not_ready_reason: str | None = None


def generation_hung(exc: BaseException) -> None:
    """The batcher's ``on_hung``: not ready, then a warm shutdown that exits with EXIT_HUNG."""
    global not_ready_reason
    not_ready_reason = f"generation hung: {exc}"
    from tasks.app import app  # (the worker's settings: where its ready file is)
    ready_flag.mark_not_ready(app.stemgen_settings.worker_ready_file)
    log.critical("worker not ready (%s); shutting down with exit status %d", not_ready_reason,
                 EXIT_HUNG)
    worker_state.should_stop = EXIT_HUNG


def readiness() -> dict:
    """``{"ready": bool}``, with ``not_ready_reason`` when not ready (for stemgen_info)."""
    if not_ready_reason is None:
        return {"ready": True}
    return {"ready": False, "not_ready_reason": not_ready_reason}


@worker_shutdown.connect
def _exit_when_hung(**_):
    if not_ready_reason is not None:
        logging.shutdown()
        os._exit(EXIT_HUNG)  # the hung thread would hold the interpreter's exit
