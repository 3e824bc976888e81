"""Worker process hooks: load the model at process start, answer health questions.

- ``worker_init`` (threads pool, the default) or ``worker_process_init`` (prefork children): the
  process loads MusicGen once (tasks.model_cache), runs a short warm-up generation and renders one
  synthetic stem (stems.render.warm_up), so the first request pays neither for loading nor for
  librosa's lazy imports and numba compilation.
- ``OutboxDispatch`` bootstep: the worker runs the outbox dispatcher (tasks.dispatcher) on a thread
  while it runs (unless ``DISPATCHER_ENABLED=false``), so every deployment with a worker dispatches.
- ``stemgen_info`` remote-control command: the worker's model and device, for ``GET /health``.
"""

from __future__ import annotations

import logging
import os
import time

from celery import bootsteps
from celery.signals import worker_init, worker_process_init
from celery.worker.control import inspect_command

from stems.engine import resolve_device
from stems.render import warm_up as render_warm_up
from tasks.app import app
from tasks.dispatcher import DispatcherThread, OutboxDispatcher
from tasks.model_cache import engine_for, loaded

log = logging.getLogger(__name__)
# The Azure SDK logs every request's headers at INFO; keep worker logs about our work.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)


def _load_model() -> None:
    settings = app.stemgen_settings
    if not settings.preload_model:
        return
    engine = engine_for(settings)
    engine.warm_up()
    started = time.perf_counter()
    render_warm_up(engine.sample_rate)
    log.info("worker process %s: %s loaded on %s (render warm-up %.1fs)", os.getpid(),
             settings.musicgen_model, engine.device, time.perf_counter() - started)


@worker_init.connect
def _load_in_worker(sender=None, **_):
    # threads/solo pools run tasks in this process: load here, before the worker reports ready.
    # A prefork pool must not (CUDA does not survive fork): its children load in worker_process_init.
    if "prefork" not in str(getattr(sender, "pool_cls", "")).lower():
        _load_model()


@worker_process_init.connect
def _load_in_child(**_):
    _load_model()


class OutboxDispatch(bootsteps.StartStopStep):
    """Runs the outbox dispatcher on a thread from worker start to worker shutdown."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.thread: DispatcherThread | None = None

    def start(self, worker):
        settings = worker.app.stemgen_settings
        if not settings.dispatcher_enabled:
            return
        from tasks.stem_tasks import deliver_callback, job_store, send_job_chord

        dispatcher = OutboxDispatcher.from_settings(settings, job_store(worker.app), send_job_chord,
                                                    resend_delivery=deliver_callback.delay)
        self.thread = DispatcherThread(dispatcher)
        self.thread.start()
        log.info("outbox dispatcher started (every %.2gs when idle)", settings.dispatcher_poll_seconds)

    def stop(self, worker):
        if self.thread is not None:
            self.thread.stop()
            self.thread = None


app.steps["worker"].add(OutboxDispatch)


@inspect_command(name="stemgen_info")
def stemgen_info(state):
    """Model and device of this worker (remote control: ``app.control.broadcast('stemgen_info')``),
    whether its model is melody-conditioned (chroma conditioning, once loaded) and the Demucs
    model ensemble requests are separated with."""
    settings = app.stemgen_settings
    info = {"model": settings.musicgen_model, "device": resolve_device(settings.stemgen_device),
            "separation_model": settings.separation_model}
    for engine in loaded():
        if engine["model"] == settings.musicgen_model:
            info["melody"] = engine["melody"]
    return info
