"""Celery tasks: one ``generate_stem`` per stem in a chord (sent by the outbox dispatcher,
``send_job_chord``) whose body is ``finalize_request``, which hands the callback to
``deliver_callback`` (retried on its own, so a down backend never causes a stem to be generated
again).

Tasks hold no audio logic: they call stems/ (generate, render) and storage/ (upload).
"""

from __future__ import annotations

import logging
import time

import redis
from celery import chord
from celery.utils.time import get_exponential_backoff_interval

from stems.engine import SamplingParams
from stems.prompts import build_stem_prompt
from stems.render import render_stem
from storage import StorageUnavailable, blob_name_for, store_from_settings
from tasks.app import app
from tasks.callback_target import CallbackPolicy
from tasks.callbacks import CallbackRetryableError, CallbackError, post_callback
from tasks.jobstore import JobNotFound, JobStore
from tasks.model_cache import get_batcher

log = logging.getLogger(__name__)

STORAGE_MAX_RETRIES = 3
#: How long the workers' job-store commands wait out a lost Redis connection (a restart).
JOBSTORE_RETRY_SECONDS = 60
#: The job store still unreachable after that: the task is retried later (a declared retry), so a
#: longer Redis outage neither loses a job's callback nor reports a generated stem as failed.
JOBSTORE_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
JOBSTORE_RETRIES = dict(autoretry_for=JOBSTORE_UNREACHABLE, retry_backoff=2, retry_backoff_max=20,
                        retry_jitter=True)


def job_store(celery_app=app) -> JobStore:
    """The JobStore of an app's settings (one per app object)."""
    store = getattr(celery_app, "_stemgen_jobstore", None)
    if store is None:
        settings = celery_app.stemgen_settings
        store = JobStore(settings.result_backend, settings.job_ttl_seconds,
                         retry_seconds=JOBSTORE_RETRY_SECONDS)
        celery_app._stemgen_jobstore = store
    return store


class _ProgressReporter:
    """Writes generation progress to the job store, at most every 2 % (MusicGen reports per token)."""

    def __init__(self, jobs: JobStore, job_id: str, stem: str, span: float):
        self._jobs, self._job_id, self._stem, self._span = jobs, job_id, stem, span
        self._last = -1.0

    def __call__(self, fraction: float) -> None:
        value = fraction * self._span
        if value - self._last >= 0.02 or fraction >= 1.0:
            self._last = value
            self._jobs.update_stem(self._job_id, self._stem, "running", value)


def sampling_params(parameters: dict, settings) -> SamplingParams:
    """Request sampling overrides on top of the configured defaults."""
    def pick(name, default):
        value = parameters.get(name)
        return default if value is None else value
    return SamplingParams(top_k=int(pick("top_k", settings.default_top_k)),
                          top_p=float(pick("top_p", settings.default_top_p)),
                          temperature=float(pick("temperature", settings.default_temperature)),
                          cfg_coef=float(pick("cfg_coef", settings.default_cfg_coef)))


def _failed(jobs: JobStore, job_id: str, stem: str, error: str) -> dict:
    result = {"stem": stem, "status": "failed", "error": error}
    jobs.update_stem(job_id, stem, "failed", 1.0, error=error)
    return result


def send_job_chord(job: dict) -> None:
    """Send a recorded job's chord: ``generate_stem`` for each stem (routed to the stems queue),
    whose results go to ``finalize_request``. ``job`` is its record (JobStore.get). Called by the
    outbox dispatcher (tasks.dispatcher), not on the gateway's request path.

    Raises:
        kombu.exceptions.OperationalError (and the transport's errors): the broker is unreachable.
    """
    job_id = job["job_id"]
    header = [generate_stem.s(job_id, state["stem"], job["request"]) for state in job["stems"]]
    chord(header)(finalize_request.s(job_id))


@app.task(bind=True, name="stemgen.generate_stem", max_retries=STORAGE_MAX_RETRIES)
def generate_stem(self, job_id: str, stem: str, request: dict) -> dict:
    """Generate, conform, encode and upload one stem; return its result dict (never raises for a
    failed generation: the failure is the result, so the chord's finalize always runs).

    Retried (Celery ``self.retry``, exponential backoff) only when storage is unreachable.
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    parameters = request["parameters"]
    bpm = float(parameters["target_bpm"])
    duration = float(parameters["duration_seconds"])
    try:
        jobs.count_run(job_id, stem)
        jobs.update_stem(job_id, stem, "running", 0.0)
        batcher = get_batcher(settings)
        engine = batcher.engine
        prompt = build_stem_prompt(stem, bpm, style=parameters.get("style"),
                                   prompt=parameters.get("prompt"))
        started = time.perf_counter()
        # Stems of one request (and compatible concurrent requests) share one MusicGen call.
        audio = batcher.generate(
            prompt, duration + settings.generation_margin_seconds,
            sampling=sampling_params(parameters, settings), seed=parameters.get("seed"),
            progress=_ProgressReporter(jobs, job_id, stem, span=0.9))
        generation_seconds = time.perf_counter() - started
        rendered = render_stem(audio, engine.sample_rate, bpm=bpm, duration_seconds=duration,
                               beats_per_bar=settings.beats_per_bar,
                               loop=bool(parameters.get("loop", False)),
                               target_lufs=settings.target_lufs,
                               max_true_peak_dbtp=settings.max_true_peak_dbtp)
        jobs.update_stem(job_id, stem, "running", 0.95)
        blob_name = blob_name_for(request["generation_request_id"], stem)
        stored = store_from_settings(settings).upload(
            blob_name, rendered.data, content_type=rendered.content_type,
            metadata={"stem": stem, "bpm": f"{bpm:g}", "duration_seconds": f"{rendered.duration_seconds:.6f}",
                      "model": settings.musicgen_model,
                      "generation_request_id": request["generation_request_id"]})
        result = {
            "stem": stem, "status": "completed", "blob_name": stored.blob_name, "url": stored.url,
            "bpm": bpm, "model": settings.musicgen_model, "device": engine.device, "prompt": prompt,
            "generation_seconds": round(generation_seconds, 3), **rendered.metadata(),
        }
        details = {k: v for k, v in result.items() if k not in ("stem", "status")}
        jobs.update_stem(job_id, stem, "completed", 1.0, **details)
        return result
    except StorageUnavailable as exc:
        if self.request.retries < self.max_retries:
            # A retry waiting for its countdown is an unacknowledged message: keep it well inside
            # the Redis visibility timeout, or a second worker would get it too.
            countdown = get_exponential_backoff_interval(
                factor=5, retries=self.request.retries, full_jitter=True,
                maximum=min(120, settings.visibility_timeout_seconds // 2))
            log.warning("storage unavailable for %s/%s, retry in %ss: %s", job_id, stem, countdown, exc)
            raise self.retry(exc=exc, countdown=countdown)
        return _failed(jobs, job_id, stem, str(exc))
    except JOBSTORE_UNREACHABLE as exc:
        log.warning("job store unreachable for %s/%s, retry in 20s: %s", job_id, stem, exc)
        raise self.retry(exc=exc, countdown=min(20, settings.visibility_timeout_seconds // 2),
                         max_retries=90)
    except Exception as exc:  # the failure becomes the stem's result; see docstring
        log.exception("stem %s of job %s failed", stem, job_id)
        return _failed(jobs, job_id, stem, f"{exc.__class__.__name__}: {exc}")


def job_state(results: list[dict]) -> str:
    """completed (every stem), failed (none), partial (some)."""
    done = sum(1 for r in results if r.get("status") == "completed")
    if done == len(results):
        return "completed"
    return "failed" if done == 0 else "partial"


def callback_payload(job: dict, results: list[dict], state: str) -> dict:
    """The body POSTed to the backend (documented in the README and the OpenAPI document)."""
    errors = [f"{r['stem']}: {r['error']}" for r in results if r.get("status") != "completed"]
    return {
        "event": "generation.finished",
        "job_id": job["job_id"],
        "generation_request_id": job["generation_request_id"],
        "audio_file_id": job["audio_file_id"],
        "status": state,
        "stems": results,
        "error": "; ".join(errors) or None,
    }


@app.task(bind=True, name="stemgen.finalize_request", max_retries=90, **JOBSTORE_RETRIES)
def finalize_request(self, results: list[dict], job_id: str) -> dict:
    """Chord body: record the job's final state, then hand the callback to deliver_callback.

    Safe to run again (a redelivered message, a second chord of the same job): the first final
    state wins (JobStore.finish) and the delivery is sent once (``delivery_enqueued``). A run that
    died between sending the delivery and noting it sends a second one, which deliver_callback's
    lock and state check make harmless.
    """
    jobs = job_store(self.app)
    job = jobs.get(job_id)
    state = job_state(results)
    if not jobs.finish(job_id, state, callback_payload(job, results, state)):
        log.info("job %s was already finished; keeping its first result", job_id)
    job = jobs.get(job_id)
    if job["callback"]["url"] and not job["delivery_enqueued"]:
        deliver_callback.delay(job_id)
        jobs.mark_delivery_enqueued(job_id)
    return {"job_id": job_id, "status": job["status"]}


def delivery_countdown(settings, attempts: int, elapsed_seconds: float) -> float | None:
    """Seconds until the next delivery attempt after ``attempts`` failed ones, or None when the
    delivery window (counted from the first attempt) is used up. Doubling from
    callback_backoff_seconds up to callback_backoff_max_seconds; the last attempt falls at the end
    of the window."""
    remaining = settings.callback_delivery_window_seconds - elapsed_seconds
    if remaining <= 0:
        return None
    backoff = get_exponential_backoff_interval(
        factor=settings.callback_backoff_seconds, retries=max(0, attempts - 1),
        maximum=settings.callback_backoff_max_seconds, full_jitter=False)
    return max(1.0, min(float(backoff), remaining))


def delivery_lock_seconds(settings) -> float:
    """Longer than one attempt can take: DNS, connect, read, bookkeeping."""
    return settings.callback_connect_timeout_seconds + settings.callback_timeout_seconds + 30


@app.task(bind=True, name="stemgen.deliver_callback", max_retries=None, **JOBSTORE_RETRIES)
def deliver_callback(self, job_id: str) -> str:
    """POST the job's callback; on connection errors, timeouts, 5xx, 408 and 429 retried with
    exponential backoff for ``callback_delivery_window_seconds``, then marked failed.

    At most one attempt per job runs at a time (a Redis lock), and the delivered/failed state is
    checked under it, so copies of this task (a redelivered message, a finalize that ran twice)
    cannot POST a second time after a success. A copy that finds the lock taken tries again after
    the lock's lifetime, in case the holder's worker died mid-attempt.
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    lock_seconds = delivery_lock_seconds(settings)
    token = jobs.acquire_delivery_lock(job_id, lock_seconds)
    if token is None:
        # (The wait stays inside the visibility timeout: a waiting retry is an unacked message.)
        raise self.retry(countdown=min(lock_seconds, settings.visibility_timeout_seconds / 2))
    try:
        return _attempt_delivery(self, settings, jobs, job_id)
    finally:
        jobs.release_delivery_lock(job_id, token)


def _attempt_delivery(task, settings, jobs: JobStore, job_id: str) -> str:
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        log.warning("callback of job %s not sent: the job record is gone", job_id)
        jobs.delivery_settled(job_id)
        return "gone"
    if job["callback"]["state"] in ("delivered", "failed"):
        jobs.delivery_settled(job_id)  # a copy re-sent by the sweep finds it done
        return job["callback"]["state"]
    attempts, started_at = jobs.start_delivery_attempt(job_id)
    try:
        post_callback(job["callback"]["url"], job["callback_payload"], event_id=job_id,
                      secret=settings.callback_secret,
                      timeout_seconds=settings.callback_timeout_seconds,
                      connect_timeout_seconds=settings.callback_connect_timeout_seconds,
                      policy=CallbackPolicy.from_settings(settings))
    except CallbackRetryableError as exc:
        countdown = delivery_countdown(settings, attempts, time.time() - started_at)
        if countdown is None:
            log.error("callback of job %s failed for good after %d attempts: %s", job_id, attempts, exc)
            jobs.update_delivery(job_id, "failed", error=str(exc))
            return "failed"
        jobs.update_delivery(job_id, "pending", error=str(exc), next_attempt_at=time.time() + countdown)
        log.warning("callback of job %s: attempt %d failed, next in %.0fs: %s",
                    job_id, attempts, countdown, exc)
        raise task.retry(exc=exc, countdown=countdown)
    except CallbackError as exc:
        log.error("callback of job %s refused: %s", job_id, exc)
        jobs.update_delivery(job_id, "failed", error=str(exc))
        return "failed"
    jobs.update_delivery(job_id, "delivered")
    return "delivered"
