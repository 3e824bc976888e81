"""Celery tasks: one ``generate_stem`` per stem in a chord whose body is ``finalize_request``,
which hands the callback to ``deliver_callback`` (retried on its own, so a down backend never
causes a stem to be generated again).

Tasks hold no audio logic: they call stems/ (generate, render) and storage/ (upload).
"""

from __future__ import annotations

import logging
import time

from celery.utils.time import get_exponential_backoff_interval

from stems.engine import SamplingParams
from stems.prompts import build_stem_prompt
from stems.render import render_stem
from storage import StorageUnavailable, blob_name_for, store_from_settings
from tasks.app import app
from tasks.callbacks import CallbackRetryableError, CallbackError, post_callback
from tasks.jobstore import JobStore
from tasks.model_cache import get_batcher

log = logging.getLogger(__name__)

STORAGE_MAX_RETRIES = 3


def job_store(celery_app=app) -> JobStore:
    """The JobStore of an app's settings (one per app object)."""
    store = getattr(celery_app, "_stemgen_jobstore", None)
    if store is None:
        settings = celery_app.stemgen_settings
        store = JobStore(settings.result_backend, settings.job_ttl_seconds)
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
        jobs.update_stem(job_id, stem, "completed", 1.0, **result)
        return result
    except StorageUnavailable as exc:
        if self.request.retries < self.max_retries:
            countdown = get_exponential_backoff_interval(factor=5, retries=self.request.retries,
                                                         maximum=120, full_jitter=True)
            log.warning("storage unavailable for %s/%s, retry in %ss: %s", job_id, stem, countdown, exc)
            raise self.retry(exc=exc, countdown=countdown)
        return _failed(jobs, job_id, stem, str(exc))
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


@app.task(bind=True, name="stemgen.finalize_request")
def finalize_request(self, results: list[dict], job_id: str) -> dict:
    """Chord body: record the job's final state, then hand the callback to deliver_callback."""
    jobs = job_store(self.app)
    job = jobs.get(job_id)
    state = job_state(results)
    payload = callback_payload(job, results, state)
    jobs.finish(job_id, state, payload)
    if job["callback"]["url"]:
        deliver_callback.delay(job_id)
    return {"job_id": job_id, "status": state}


@app.task(bind=True, name="stemgen.deliver_callback", max_retries=None)
def deliver_callback(self, job_id: str) -> str:
    """POST the job's callback; retried with exponential backoff on connection errors, timeouts and
    5xx answers, up to ``callback_max_retries``; then the delivery is marked failed."""
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    job = jobs.get(job_id)
    if job["callback"]["state"] == "delivered":
        return "delivered"
    attempts = job["callback"]["attempts"] + 1
    jobs.update_delivery(job_id, "delivering", attempts=attempts)
    try:
        post_callback(job["callback"]["url"], job["callback_payload"], event_id=job_id,
                      secret=settings.callback_secret,
                      timeout_seconds=settings.callback_timeout_seconds)
    except CallbackRetryableError as exc:
        if self.request.retries >= settings.callback_max_retries:
            jobs.update_delivery(job_id, "failed", error=str(exc))
            return "failed"
        jobs.update_delivery(job_id, "pending", error=str(exc))
        countdown = get_exponential_backoff_interval(
            factor=settings.callback_backoff_seconds, retries=self.request.retries,
            maximum=settings.callback_backoff_max_seconds, full_jitter=False)
        raise self.retry(exc=exc, countdown=countdown)
    except CallbackError as exc:
        jobs.update_delivery(job_id, "failed", error=str(exc))
        return "failed"
    jobs.update_delivery(job_id, "delivered")
    return "delivered"
