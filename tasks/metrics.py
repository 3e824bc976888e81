"""A worker's Prometheus metrics, served on its own port (``WORKER_METRICS_PORT``; tasks.worker).

The pool is threads (tasks.app): the tasks run in the worker's main process, whose default
registry ``start_http_server`` serves. (A prefork pool's children would each need their own
registry; not supported.)

Metrics (all prefixed ``stemgen_``; docs/operations.md, "Metrics and logs"):

- ``stems_generated_total{stem, arrangement}`` / ``stems_failed_total{stem, arrangement}``: stems
  completed (uploaded) / failed for good (after their retries).
- ``generation_seconds{arrangement}``: a task's MusicGen generation, from handing it to the batcher
  to getting its clip (the wait for company in the batch included).
- ``stem_audio_seconds{arrangement}``: length of each completed stem.
- ``batch_size{model}``: clips per MusicGen call (stems.batching.StemBatcher.stats, read after each
  generation).
- ``model_load_seconds{model, device}`` / ``model_warmup_seconds{model, device}``: loading the
  model at process start / the warm-up generation (CUDA graph capture included) and render.
- ``queue_wait_seconds{task}``: from publishing a task (or its ETA, for a retry's countdown) to
  its start, by the publisher's clock (``before_task_publish`` stamps a ``stemgen_sent_at``
  header); tasks published without it (by a process that does not import tasks.worker) are not
  counted.
- ``task_runs_total{task, state}`` and ``task_duration_seconds{task}``: each task run, by Celery
  state (SUCCESS, RETRY, FAILURE).
- ``callback_deliveries_total{outcome}``: callback attempts (tasks.callbacks.post_callback) by
  outcome: ``success`` (2xx), ``retryable`` (connection error, timeout, 5xx, 408, 429),
  ``rejected`` (another 4xx or a 3xx), ``refused`` (the SSRF guard refused the URL); and
  ``callback_duration_seconds{outcome}``.
- ``jobs_finished_total{status}``: jobs given their final state by finalize_request (once per
  job): ``completed``, ``partial``, ``failed`` or ``cancelled``.
- ``callbacks_failed_total{reason}``: callbacks marked failed for good: ``window`` (retryable
  failures until the delivery window ran out) or ``rejected`` (a non-retryable answer, or a URL the
  SSRF guard refused). Both values are exported at 0 once the metrics server starts, so that the
  first failure is an increase Prometheus sees.
- ``cuda_memory_allocated_bytes{device}``, ``cuda_memory_reserved_bytes{device}``,
  ``cuda_memory_max_allocated_bytes{device}``: registered only on a CUDA worker, read at scrape.

Every metric has labels: a process that imports this module but never uses it (the gateway,
importing tasks) exports nothing from it, even in multiprocess mode.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

#: Header stamped on every task message this process publishes (Unix seconds).
SENT_AT_HEADER = "stemgen_sent_at"

GENERATION_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
AUDIO_BUCKETS = (1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                1800.0, 3600.0)
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
CALLBACK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

STEMS_GENERATED = Counter("stemgen_stems_generated", "Stems completed (rendered and uploaded)",
                          ["stem", "arrangement"])
STEMS_FAILED = Counter("stemgen_stems_failed", "Stems failed for good", ["stem", "arrangement"])
WORKER_READY = Gauge("stemgen_worker_ready",
                     "1 once the worker's model passed its start self-check (tasks.readiness) and "
                     "while it takes work; 0 before, and once a generation outlived its deadline "
                     "(tasks.device_watchdog: it then exits)")
KEPT_RENDERS_UPLOADED = Counter("stemgen_kept_renders_uploaded",
                                "Stems uploaded from a render kept after a failed upload (no "
                                "generation)", ["stem"])
GENERATION_SECONDS = Histogram("stemgen_generation_seconds",
                               "A task's MusicGen generation through the batcher",
                               ["arrangement"], buckets=GENERATION_BUCKETS)
AUDIO_SECONDS = Histogram("stemgen_stem_audio_seconds", "Length of each completed stem",
                          ["arrangement"], buckets=AUDIO_BUCKETS)
BATCH_SIZE = Histogram("stemgen_batch_size", "Clips per MusicGen call", ["model"],
                       buckets=BATCH_BUCKETS)
MODEL_LOAD_SECONDS = Gauge("stemgen_model_load_seconds", "Loading the model at process start",
                           ["model", "device"])
MODEL_WARMUP_SECONDS = Gauge("stemgen_model_warmup_seconds",
                             "Warm-up generation (CUDA graph capture included) and render at start",
                             ["model", "device"])
QUEUE_WAIT_SECONDS = Histogram("stemgen_queue_wait_seconds",
                               "From a task's publication (or ETA) to its start", ["task"],
                               buckets=WAIT_BUCKETS)
TASK_RUNS = Counter("stemgen_task_runs", "Task runs by final Celery state", ["task", "state"])
TASK_SECONDS = Histogram("stemgen_task_duration_seconds", "Run time of a task", ["task"],
                         buckets=TASK_BUCKETS)
CALLBACK_DELIVERIES = Counter("stemgen_callback_deliveries", "Callback attempts by outcome",
                              ["outcome"])
CALLBACK_SECONDS = Histogram("stemgen_callback_duration_seconds", "One callback attempt",
                             ["outcome"], buckets=CALLBACK_BUCKETS)
JOBS_FINISHED = Counter("stemgen_jobs_finished", "Jobs given their final state", ["status"])
CALLBACKS_FAILED = Counter("stemgen_callbacks_failed", "Callbacks marked failed for good", ["reason"])
CALLBACK_FAILURE_REASONS = ("window", "rejected")

_lock = threading.Lock()
_batch_calls_seen: dict[int, int] = {}
_cuda_registered: set[str] = set()


def start_server(settings) -> bool:
    """Serve this process's metrics on ``settings.worker_metrics_port`` (0: not at all). A port in
    use (a second worker on the host) is logged, not fatal. Returns whether it serves."""
    port = settings.worker_metrics_port
    if not port:
        return False
    for reason in CALLBACK_FAILURE_REASONS:
        CALLBACKS_FAILED.labels(reason)
    try:
        start_http_server(port, addr=settings.worker_metrics_addr)
    except OSError as exc:
        log.warning("worker metrics not served on %s:%s: %s", settings.worker_metrics_addr, port, exc)
        return False
    log.info("worker metrics on http://%s:%s/metrics", settings.worker_metrics_addr, port)
    return True


# --- task path -----------------------------------------------------------------------------------

def stamp_sent_at(headers=None, **_) -> None:
    """``before_task_publish`` receiver: note when the message was published."""
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()


def _ready_at(request) -> float | None:
    """When a task could first start: its publication, or its ETA if later."""
    sent_at = request.get(SENT_AT_HEADER)
    if sent_at is None:
        return None
    ready = float(sent_at)
    eta = request.get("eta")
    if eta:
        try:
            when = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            ready = max(ready, when.timestamp())
        except ValueError:
            pass
    return ready


def task_started(task) -> float | None:
    """At a task's start: observe its queue wait; returns the wait (None when unknown)."""
    ready = _ready_at(task.request)
    if ready is None:
        return None
    wait = max(0.0, time.time() - ready)
    QUEUE_WAIT_SECONDS.labels(task.name).observe(wait)
    return wait


def task_finished(task_name: str, state: str | None, seconds: float) -> None:
    TASK_RUNS.labels(task_name, state or "UNKNOWN").inc()
    TASK_SECONDS.labels(task_name).observe(seconds)


def generation_done(batcher, model: str, arrangement: str, seconds: float) -> None:
    """After a task's generation: its time, and the batcher's calls since the last look."""
    GENERATION_SECONDS.labels(arrangement).observe(seconds)
    observe_batches(batcher, model)


def observe_batches(batcher, model: str) -> None:
    """Observe the sizes of the batcher's calls made since the last look (its stats keep the
    latest 64; more calls between two looks are not all seen)."""
    stats = batcher.stats()
    with _lock:
        seen = _batch_calls_seen.get(id(batcher), 0)
        new = stats.calls - seen
        if new <= 0:
            return
        _batch_calls_seen[id(batcher)] = stats.calls
        sizes = stats.recent_sizes[-new:] if new <= len(stats.recent_sizes) else stats.recent_sizes
    for size in sizes:
        BATCH_SIZE.labels(model).observe(size)


def stem_completed(stem: str, arrangement: str, audio_seconds: float) -> None:
    STEMS_GENERATED.labels(stem, arrangement).inc()
    AUDIO_SECONDS.labels(arrangement).observe(audio_seconds)


def worker_ready(ready: bool) -> None:
    WORKER_READY.set(1 if ready else 0)


def kept_render_uploaded(stem: str) -> None:
    KEPT_RENDERS_UPLOADED.labels(stem).inc()


def stem_failed(stem: str, arrangement: str) -> None:
    STEMS_FAILED.labels(stem, arrangement).inc()


def callback_attempt(outcome: str, seconds: float) -> None:
    CALLBACK_DELIVERIES.labels(outcome).inc()
    CALLBACK_SECONDS.labels(outcome).observe(seconds)


def job_finished(status: str) -> None:
    JOBS_FINISHED.labels(status).inc()


def callback_failed(reason: str) -> None:
    """A callback marked failed for good; ``reason`` one of CALLBACK_FAILURE_REASONS."""
    CALLBACKS_FAILED.labels(reason).inc()


def model_loaded(model: str, device: str, load_seconds: float, warmup_seconds: float | None = None) -> None:
    MODEL_LOAD_SECONDS.labels(model, device).set(load_seconds)
    if warmup_seconds is not None:
        MODEL_WARMUP_SECONDS.labels(model, device).set(warmup_seconds)


# --- CUDA memory ---------------------------------------------------------------------------------

class CudaMemoryCollector:
    """torch.cuda's allocator counters of one device, read at each scrape."""

    def __init__(self, device: str):
        self.device = device

    def collect(self):
        import torch

        families = (
            ("stemgen_cuda_memory_allocated_bytes", "Memory held by tensors",
             torch.cuda.memory_allocated),
            ("stemgen_cuda_memory_reserved_bytes", "Memory reserved by the caching allocator",
             torch.cuda.memory_reserved),
            ("stemgen_cuda_memory_max_allocated_bytes", "Peak memory held by tensors since start",
             torch.cuda.max_memory_allocated),
        )
        for name, documentation, read in families:
            family = GaugeMetricFamily(name, documentation, labels=["device"])
            family.add_metric([self.device], float(read(self.device)))
            yield family


def register_cuda_memory(device: str, registry=REGISTRY) -> bool:
    """Export the CUDA memory of ``device`` ("cuda", "cuda:N"); nothing for another device or
    without CUDA. Returns whether it is registered (once per device)."""
    if not device.startswith("cuda"):
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    device = str(torch.device(device if ":" in device else f"cuda:{torch.cuda.current_device()}"))
    with _lock:
        if device in _cuda_registered:
            return True
        _cuda_registered.add(device)
    registry.register(CudaMemoryCollector(device))
    return True
