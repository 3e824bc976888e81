"""Worker process hooks: load the model at process start, answer health questions.

- ``ModelStart`` bootstep (before the consumer, Celery's last worker step): the process loads
  MusicGen once (tasks.model_cache), captures its CUDA graphs, runs a short warm-up generation and
  the decoding self-check, and renders one synthetic stem (stems.render.warm_up), so the first
  request pays neither for loading nor for librosa's lazy imports and numba compilation. Any
  failure there ends the worker with a non-zero status before it consumes a message ("Unrecoverable
  error"), so compose and k8s restart it. Only then is the ready flag written (tasks.readiness),
  which the probes read. The pool is Celery's threads pool (tasks.app): the model lives in the
  worker's own process; a prefork pool is not supported (CUDA does not survive a fork).
- ``OutboxDispatch`` bootstep: the worker runs the outbox dispatcher (tasks.dispatcher) on a thread
  while it runs (unless ``DISPATCHER_ENABLED=false``), so every deployment with a worker dispatches.
- ``stemgen_info`` remote-control command: the worker's model and device, for ``GET /health``.
- Logging (stemgen_logging, ``LOG_FORMAT``) instead of Celery's, each task's run a log scope with
  its job's ids (``task_prerun``/``task_postrun``); Prometheus metrics (tasks.metrics) on
  ``WORKER_METRICS_PORT``, with the model's load time, queue waits and task runs.
"""

from __future__ import annotations

import inspect
import logging
import os
import time

from celery import bootsteps
from celery.signals import before_task_publish, setup_logging, task_postrun, task_prerun, worker_init
from celery.worker.control import inspect_command

import stemgen_logging
from stems.engine import SamplingParams, on_short_lived_thread, resolve_device
from stems.render import warm_up as render_warm_up
from tasks import device_watchdog, metrics, readiness
from tasks.app import app
from tasks.dispatcher import DispatcherThread, OutboxDispatcher
from tasks.model_cache import engine_for, loaded

log = logging.getLogger(__name__)
# The Azure SDK logs every request's headers at INFO; keep worker logs about our work.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)


def _load_model() -> dict:
    """Load, capture, warm up and self-check; returns what the ready flag records."""
    settings = app.stemgen_settings
    if not settings.preload_model:
        return {"model": settings.musicgen_model, "preloaded": False}
    started = time.perf_counter()
    engine = engine_for(settings)
    load_seconds = time.perf_counter() - started
    # graph mode captures every bucket up to the batcher's largest batch here, not on a request
    sampling = SamplingParams(top_k=settings.default_top_k, top_p=settings.default_top_p,
                              temperature=settings.default_temperature,
                              cfg_coef=settings.default_cfg_coef)
    captured = engine.warm_up(batch_size=settings.batch_max_size if engine.mode == "graph" else 1,
                              sampling=sampling)
    check = engine.self_check()
    readiness.record_decoding(settings.musicgen_model, engine)
    render_started = time.perf_counter()
    render_warm_up(engine.sample_rate)
    metrics.model_loaded(settings.musicgen_model, str(engine.device), load_seconds,
                         time.perf_counter() - started - load_seconds)
    log.info("worker process %s: %s loaded on %s, %s decoding in %s (CUDA graph capture %.1fs, "
             "render warm-up %.1fs)", os.getpid(), settings.musicgen_model, engine.device,
             engine.mode, engine.precision, captured, time.perf_counter() - render_started)
    return {"model": settings.musicgen_model, "device": str(engine.device), "mode": engine.mode,
            "precision": engine.precision, "self_check": check}


@setup_logging.connect
def _setup_logging(**_):
    """stemgen's log format (LOG_FORMAT, LOG_LEVEL) instead of Celery's (stemgen_logging)."""
    stemgen_logging.configure_logging(app.stemgen_settings, "worker")


@worker_init.connect
def _observe(sender=None, **_):
    # worker_init comes before Celery's setup_logging: log the model's loading in our format too
    _setup_logging()
    settings = app.stemgen_settings
    metrics.start_server(settings)
    metrics.register_cuda_memory(resolve_device(settings.stemgen_device))
    readiness.mark_not_ready(settings.worker_ready_file)  # a flag left by an earlier process


#: Message header carrying the publisher's job ids (job_id, generation_request_id) to the task.
LOG_CONTEXT_HEADER = "stemgen_log_context"


@before_task_publish.connect
def _stamp(headers=None, **_):
    """Stamp each message this process publishes with its time (queue wait, tasks.metrics) and the
    job ids of the scope publishing it (a chord's finalize, a delivery, a retry), so that a task
    whose arguments lack the generation_request_id still logs it from its first line."""
    if headers is None:
        return
    metrics.stamp_sent_at(headers=headers)
    context = stemgen_logging.current_context()
    ids = {key: context[key] for key in ("job_id", "generation_request_id") if key in context}
    if ids:
        headers[LOG_CONTEXT_HEADER] = ids


#: Open log scopes of the running tasks (task id → (token, start)).
_task_scopes: dict[str, tuple] = {}


def _task_fields(task, args, kwargs) -> dict:
    """The job's ids in a stemgen task's arguments (job_id, stem or stems, request)."""
    try:
        bound = inspect.signature(task.run).bind_partial(*(args or ()), **(kwargs or {})).arguments
    except (TypeError, ValueError):
        return {}
    request = bound.get("request")
    stems = bound.get("stems")
    return {"job_id": bound.get("job_id") if isinstance(bound.get("job_id"), str) else None,
            "stem": bound.get("stem") or (",".join(stems) if isinstance(stems, list) else None),
            "generation_request_id": (request.get("generation_request_id")
                                      if isinstance(request, dict) else None)}


@task_prerun.connect
def _task_started(task_id=None, task=None, args=None, kwargs=None, **_):
    fields = _task_fields(task, args, kwargs)
    carried = task.request.get(LOG_CONTEXT_HEADER)
    if isinstance(carried, dict) and fields.get("job_id") and carried.get("job_id") == fields["job_id"]:
        fields["generation_request_id"] = (fields.get("generation_request_id")
                                           or carried.get("generation_request_id"))
    token = stemgen_logging.scope(task=task.name, task_id=task_id, **fields)
    _task_scopes[task_id] = (token, time.perf_counter())
    wait = metrics.task_started(task)
    log.info("task %s started%s", task.name, "" if wait is None else f" after {wait:.3f}s in the queue")


@task_postrun.connect
def _task_finished(task_id=None, task=None, state=None, **_):
    token, started = _task_scopes.pop(task_id, (None, None))
    if started is not None:
        seconds = time.perf_counter() - started
        metrics.task_finished(task.name, state, seconds)
        log.info("task %s finished: %s in %.3fs", task.name, state, seconds)
    stemgen_logging.end_scope(token)


class ModelStart(bootsteps.StartStopStep):
    """Loads the model before the consumer starts (``Consumer`` is Celery's last worker step), then
    writes the ready flag. An exception propagates to Celery's ``WorkController.start``, which
    logs "Unrecoverable error" and stops the worker with a non-zero exit status: no message is
    consumed by a worker whose model failed to load, warm up or capture."""

    def start(self, worker):
        settings = worker.app.stemgen_settings
        # on a thread that ends: torch's OpenMP pool goes with it (stems.engine.on_short_lived_thread)
        info = on_short_lived_thread(_load_model)
        readiness.mark_ready(settings.worker_ready_file, info)

    def stop(self, worker):
        readiness.mark_not_ready(worker.app.stemgen_settings.worker_ready_file)


app.steps["worker"].add(ModelStart)


class OutboxDispatch(bootsteps.StartStopStep):
    """Runs the outbox dispatcher on a thread from worker start to worker shutdown."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.thread: DispatcherThread | None = None

    def start(self, worker):
        settings = worker.app.stemgen_settings
        if not settings.dispatcher_enabled:
            return
        from tasks.callback_delivery import deliver_callback
        from tasks.stem_tasks import send_job_chord
        from tasks.worker_jobstore import job_store

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
    whether its model is melody-conditioned (chroma conditioning, once loaded), how it decodes
    (engine mode, precision, CUDA-graph capture seconds, static-decoder fallbacks) and the Demucs
    model ensemble requests are separated with."""
    settings = app.stemgen_settings
    info = {"model": settings.musicgen_model, "device": resolve_device(settings.stemgen_device),
            "separation_model": settings.separation_model, **device_watchdog.readiness()}
    for engine in loaded():
        if engine["model"] == settings.musicgen_model:
            info.update({k: engine[k] for k in ("melody", "mode", "precision",
                                                "warm_up_capture_seconds", "decoder_fallbacks",
                                                "self_check", "decoding_bytes")})
    return info
