"""Celery tasks: one ``generate_stem`` per stem (or one ``generate_ensemble`` for all stems of an
ensemble request) in a chord (sent by the outbox dispatcher, ``send_job_chord``) whose body is
``finalize_request``, which hands the callback to
``deliver_callback`` (retried on its own, so a down backend never causes a stem to be generated
again).

Tasks hold no audio logic: they call stems/ (generate, render) and storage/ (upload).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis
from celery import chord
from celery.utils.time import get_exponential_backoff_interval

import stemgen_logging
from stems.analysis import coherence, stem_analysis
from stems.audio import OutputSpec
from stems.batching import GenerationCancelled
from stems.engine import SamplingParams
from stems.plan import MusicalPlan, parse_key
from stems.prompts import HARMONIC_STEMS, build_ensemble_prompt, build_stem_prompt
from stems.render import conform_clip, finish_stem, render_stem
from stems.separation import stem_energy_db
from storage import StorageUnavailable, blob_name_for, store_from_settings
from tasks import metrics
from tasks.app import app
from tasks.callback_target import CallbackPolicy
from tasks.callbacks import CallbackRetryableError, CallbackError, post_callback
from tasks.jobstore import JobNotFound, JobStore
from tasks.model_cache import decoding_precision, get_batcher, get_separator
from tasks.planning import conditioning_for, make_job_plan, plan_from_record
from tasks.source_audio import load_source

log = logging.getLogger(__name__)

STORAGE_MAX_RETRIES = 3
#: How long the workers' job-store commands wait out a lost Redis connection (a restart).
JOBSTORE_RETRY_SECONDS = 60
#: The job store still unreachable after that: the task is retried later (a declared retry), so a
#: longer Redis outage neither loses a job's callback nor reports a generated stem as failed.
JOBSTORE_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
JOBSTORE_RETRIES = dict(autoretry_for=JOBSTORE_UNREACHABLE, retry_backoff=2, retry_backoff_max=20,
                        retry_jitter=True)


class ModelNotHeld(RuntimeError):
    """A generation task reached a worker that holds another model than the job asked for (a
    deployment whose workers of two models consume one queue)."""


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
        self.last = -1.0  # the progress last written (-1: none yet)

    def __call__(self, fraction: float) -> None:
        value = fraction * self._span
        if value - self.last >= 0.02 or fraction >= 1.0:
            self.last = value
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


def _failed(jobs: JobStore, job_id: str, stem: str, error: str,
            arrangement: str = "independent") -> dict:
    result = {"stem": stem, "status": "failed", "error": error}
    metrics.stem_failed(stem, arrangement)
    jobs.update_stem(job_id, stem, "failed", 1.0, error=error)
    return result


def _cancelled(jobs: JobStore, job_id: str, stem: str, progress: float = 0.0) -> dict:
    """Record a stem that stopped (or never started) because its job was cancelled."""
    log.info("stem %s of job %s cancelled", stem, job_id)
    jobs.update_stem(job_id, stem, "cancelled", progress)
    return {"stem": stem, "status": "cancelled"}


@contextlib.contextmanager
def _cancel_watch(jobs: JobStore, job_id: str, poll_seconds: float):
    """An Event set once the job's cancellation is requested (DELETE /jobs/<id>), polled every
    ``poll_seconds`` while the block runs; the batcher drops the row at its next decoding step."""
    cancel, done = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(poll_seconds):
            try:
                if jobs.cancel_requested(job_id):
                    cancel.set()
                    return
            except Exception:  # a Redis hiccup: look again at the next poll
                log.debug("cancel poll of job %s failed", job_id, exc_info=True)

    watcher = threading.Thread(target=watch, name=f"cancel-watch-{job_id}", daemon=True)
    watcher.start()
    try:
        yield cancel
    finally:
        done.set()


def send_job_chord(job: dict) -> None:
    """Send a recorded job's chord, whose results go to ``finalize_request``: ``generate_stem`` for
    each stem (routed to the queue of the job's model), or, for ``arrangement: "ensemble"``, one
    ``generate_ensemble`` for all of them. ``job`` is its record (JobStore.get). Called by the
    outbox dispatcher (tasks.dispatcher), not on the gateway's request path.

    Raises:
        kombu.exceptions.OperationalError (and the transport's errors): the broker is unreachable.
    """
    job_id, request = job["job_id"], job["request"]
    stems = [state["stem"] for state in job["stems"]]
    settings = app.stemgen_settings
    # the queue of the workers holding the job's model (one queue per served model)
    queue = settings.stems_queue_for(request["parameters"].get("model") or settings.served_models[0])
    if request["parameters"].get("arrangement") == "ensemble":
        header = [generate_ensemble.s(job_id, stems, request).set(queue=queue)]
    else:
        header = [generate_stem.s(job_id, stem, request).set(queue=queue) for stem in stems]
    chord(header)(finalize_request.s(job_id))


def _job_plan(jobs: JobStore, job_id: str, request: dict, settings, source) -> MusicalPlan:
    """The job's plan: as recorded at submission, else made here from the source and recorded
    (the first one recorded wins, see JobStore.claim_plan)."""
    record = jobs.get(job_id).get("plan")
    if record is None:
        record = jobs.claim_plan(job_id, make_job_plan(request, settings.beats_per_bar, source))
    return plan_from_record(record)


def _source(request: dict, settings):
    """The request's analysed source audio, or None (tasks.source_audio)."""
    if not request["parameters"].get("condition_on_audio"):
        return None
    return load_source(request, settings)


def _store_stem(settings, jobs: JobStore, job_id: str, request: dict, stem: str, rendered,
                plan: MusicalPlan, **extra) -> dict:
    """Upload a rendered stem, analyse it against the plan, record it completed; its result.
    The blob's extension and content type, and the result's format fields, are the rendered
    file's (parameters.output)."""
    blob_name = blob_name_for(request["generation_request_id"], stem, rendered.extension)
    stored = store_from_settings(settings).upload(
        blob_name, rendered.data, content_type=rendered.content_type,
        metadata={"stem": stem, "bpm": f"{plan.bpm:g}", "format": rendered.extension,
                  "sample_rate": str(rendered.sample_rate),
                  "duration_seconds": f"{rendered.duration_seconds:.6f}",
                  "key": plan.key.name, "model": settings.musicgen_model,
                  "generation_request_id": request["generation_request_id"]})
    analysis = stem_analysis(rendered.audio, rendered.sample_rate, plan,
                             harmonic=stem in HARMONIC_STEMS)
    metadata = rendered.metadata()
    warnings = list(extra.pop("warnings", None) or []) + metadata.pop("warnings", [])
    result = {"stem": stem, "status": "completed", "blob_name": stored.blob_name, "url": stored.url,
              "bpm": plan.bpm, "model": settings.musicgen_model,
              # a seeded request repeats exactly only at the same precision (docs/decoding.md)
              "precision": decoding_precision(settings.musicgen_model), **extra,
              **metadata, "analysis": analysis}
    if warnings or "silent" in extra:  # (an ensemble stem always lists its warnings)
        result["warnings"] = warnings
    details = {k: v for k, v in result.items() if k not in ("stem", "status")}
    jobs.update_stem(job_id, stem, "completed", 1.0, **details)
    metrics.stem_completed(stem, extra.get("arrangement", "independent"), rendered.duration_seconds)
    return result


def _retry_later(task, settings, exc: Exception, what: str):
    """The declared retry of a stem task: storage unreachable (exponential backoff, at most
    STORAGE_MAX_RETRIES) or the job store unreachable. Returns None when the storage retries are
    used up (the caller then fails the stem)."""
    if isinstance(exc, StorageUnavailable):
        if task.request.retries >= task.max_retries:
            return None
        # A retry waiting for its countdown is an unacknowledged message: keep it well inside
        # the Redis visibility timeout, or a second worker would get it too.
        countdown = get_exponential_backoff_interval(
            factor=5, retries=task.request.retries, full_jitter=True,
            maximum=min(120, settings.visibility_timeout_seconds // 2))
        log.warning("storage unavailable for %s, retry in %ss: %s", what, countdown, exc)
        return task.retry(exc=exc, countdown=countdown)
    log.warning("job store unreachable for %s, retry in 20s: %s", what, exc)
    return task.retry(exc=exc, countdown=min(20, settings.visibility_timeout_seconds // 2),
                      max_retries=90)


@dataclass(frozen=True)
class _Generation:
    """What the MusicGen step of a stem or ensemble task made, and from what."""

    audio: np.ndarray           # [channels, samples] at sample_rate
    sample_rate: int            # Hz
    device: str
    plan: MusicalPlan
    prompt: str
    conditioning: str | None    # "chroma", "continuation" or None
    seconds: float              # wall time of the generation


def _generate(settings, jobs: JobStore, job_id: str, request: dict, stems: list[str], *,
              ensemble: bool, progress) -> _Generation:
    """The steps both tasks share: fetch and analyse the source (if any), take the job's plan,
    build the prompt (one stem's, or the ensemble's for ``stems``), choose the conditioning and
    generate through the worker's batcher."""
    parameters = request["parameters"]
    wanted = parameters.get("model")
    if wanted and wanted != settings.musicgen_model:  # a queue shared by two models' workers
        raise ModelNotHeld(f"this worker holds {settings.musicgen_model}, the job asked for {wanted}")
    batcher = get_batcher(settings)
    engine = batcher.engine
    source = _source(request, settings)
    plan = _job_plan(jobs, job_id, request, settings, source)
    text = dict(style=parameters.get("style"), prompt=parameters.get("prompt"),
                harmony=plan.prompt_text())
    if ensemble:
        prompt = build_ensemble_prompt(stems, plan.bpm, **text)
    else:
        prompt = build_stem_prompt(stems[0], plan.bpm, **text)
    conditioning = conditioning_for(None if ensemble else stems[0], plan,
                                    melody_model=engine.supports_melody, source=source,
                                    settings=settings)
    started = time.perf_counter()
    # Stems of one request (and compatible concurrent requests) share one MusicGen call.
    with _cancel_watch(jobs, job_id, settings.cancel_poll_seconds) as cancel:
        audio = batcher.generate(
            prompt, float(parameters["duration_seconds"]) + settings.generation_margin_seconds,
            sampling=sampling_params(parameters, settings), seed=parameters.get("seed"),
            progress=progress, conditioning=conditioning, cancel=cancel)
    seconds = time.perf_counter() - started
    metrics.generation_done(batcher, settings.musicgen_model,
                            "ensemble" if ensemble else "independent", seconds)
    return _Generation(audio, engine.sample_rate, engine.device, plan, prompt,
                       conditioning.kind if conditioning else None, seconds)


@app.task(bind=True, name="stemgen.generate_stem", max_retries=STORAGE_MAX_RETRIES)
def generate_stem(self, job_id: str, stem: str, request: dict) -> dict:
    """Generate, conform, encode and upload one stem; return its result dict (never raises for a
    failed generation: the failure is the result, so the chord's finalize always runs).

    The prompt carries the plan's key and chords; a melody model is conditioned on the plan's
    chords or the source audio, a text model continues the source (tasks.planning).
    Retried (Celery ``self.retry``, exponential backoff) only when storage is unreachable.
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    parameters = request["parameters"]
    duration = float(parameters["duration_seconds"])
    try:
        if jobs.cancel_requested(job_id):  # cancelled while queued: never starts
            return _cancelled(jobs, job_id, stem)
        output = OutputSpec.from_dict(parameters.get("output"))
        jobs.count_run(job_id, stem)
        jobs.update_stem(job_id, stem, "running", 0.0)
        reporter = _ProgressReporter(jobs, job_id, stem, span=0.9)
        try:
            made = _generate(settings, jobs, job_id, request, [stem], ensemble=False,
                             progress=reporter)
        except GenerationCancelled:
            return _cancelled(jobs, job_id, stem, max(reporter.last, 0.0))
        rendered = render_stem(made.audio, made.sample_rate, bpm=made.plan.bpm,
                               duration_seconds=duration, beats_per_bar=settings.beats_per_bar,
                               loop=bool(parameters.get("loop", False)),
                               target_lufs=settings.target_lufs,
                               max_true_peak_dbtp=settings.max_true_peak_dbtp, output=output)
        jobs.update_stem(job_id, stem, "running", 0.95)
        return _store_stem(settings, jobs, job_id, request, stem, rendered, made.plan,
                           device=made.device, prompt=made.prompt, conditioning=made.conditioning,
                           generation_seconds=round(made.seconds, 3))
    except (StorageUnavailable, *JOBSTORE_UNREACHABLE) as exc:
        retry = _retry_later(self, settings, exc, f"{job_id}/{stem}")
        if retry is None:
            return _failed(jobs, job_id, stem, str(exc))
        raise retry
    except Exception as exc:  # the failure becomes the stem's result; see docstring
        log.exception("stem %s of job %s failed", stem, job_id)
        return _failed(jobs, job_id, stem, f"{exc.__class__.__name__}: {exc}")


class _EnsembleProgress:
    """One generation's progress, reported for every stem it will be separated into."""

    def __init__(self, reporters: list[_ProgressReporter]):
        self._reporters = reporters

    def __call__(self, fraction: float) -> None:
        for reporter in self._reporters:
            reporter(fraction)


@app.task(bind=True, name="stemgen.generate_ensemble", max_retries=STORAGE_MAX_RETRIES)
def generate_ensemble(self, job_id: str, stems: list[str], request: dict) -> list[dict]:
    """Generate the whole arrangement in one MusicGen call, conform the mix to the grid, separate
    it into ``stems`` with Demucs, then render and upload each stem; return the stems' results.

    The stems are parts of one performance by construction: they share the generation's tempo,
    harmony and phrasing, and one conform (the same warp), so they stay in sync sample for
    sample. A separated stem whose level is below ``SEPARATION_SILENT_STEM_DB`` relative to the
    mix is kept at its level and reported (``silent: true`` and a warning). Per-stem state and
    progress are kept as for ``generate_stem``; failures become the stems' results. Retried
    only when storage is unreachable.
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    parameters = request["parameters"]
    duration = float(parameters["duration_seconds"])
    results: dict[str, dict] = {}
    try:
        if jobs.cancel_requested(job_id):  # cancelled while queued: never starts
            return [_cancelled(jobs, job_id, stem) for stem in stems]
        output = OutputSpec.from_dict(parameters.get("output"))
        for stem in stems:
            jobs.count_run(job_id, stem)
            jobs.update_stem(job_id, stem, "running", 0.0)
        progress = _EnsembleProgress([_ProgressReporter(jobs, job_id, s, span=0.7) for s in stems])
        try:
            made = _generate(settings, jobs, job_id, request, stems, ensemble=True,
                             progress=progress)
        except GenerationCancelled:
            return [_cancelled(jobs, job_id, stem) for stem in stems]
        rate = made.sample_rate
        conformed = conform_clip(made.audio, rate, bpm=made.plan.bpm, duration_seconds=duration,
                                 beats_per_bar=settings.beats_per_bar,
                                 loop=bool(parameters.get("loop", False)))
        started = time.perf_counter()
        separator = get_separator(settings)
        parts = separator.separate(conformed.audio, rate, stems)
        separation_seconds = time.perf_counter() - started
        for stem in stems:
            jobs.update_stem(job_id, stem, "running", 0.9)
            level_db = stem_energy_db(parts[stem], conformed.audio)
            silent = bool(level_db < settings.separation_silent_stem_db)
            rendered = finish_stem(parts[stem], rate, conformed.analysis,
                                   target_lufs=settings.target_lufs,
                                   max_true_peak_dbtp=settings.max_true_peak_dbtp,
                                   normalise=not silent, output=output,
                                   loop=bool(parameters.get("loop", False)))
            warnings = ([f"nearly silent after separation: {level_db:.1f} dB relative to the mix "
                         f"(threshold {settings.separation_silent_stem_db:g} dB)"] if silent else [])
            results[stem] = _store_stem(
                settings, jobs, job_id, request, stem, rendered, made.plan, device=made.device,
                prompt=made.prompt, arrangement="ensemble", conditioning=made.conditioning,
                generation_seconds=round(made.seconds, 3),
                separation={"model": settings.separation_model, "level_db": round(level_db, 2),
                            "seconds": round(separation_seconds, 3)},
                silent=silent, warnings=warnings)
        return [results[stem] for stem in stems]
    except (StorageUnavailable, *JOBSTORE_UNREACHABLE) as exc:
        retry = _retry_later(self, settings, exc, f"{job_id} (ensemble)")
        if retry is None:
            return [results.get(stem) or _failed(jobs, job_id, stem, str(exc), "ensemble")
                    for stem in stems]
        raise retry
    except Exception as exc:  # the failure becomes the stems' results; see docstring
        log.exception("ensemble of job %s failed", job_id)
        error = f"{exc.__class__.__name__}: {exc}"
        return [results.get(stem) or _failed(jobs, job_id, stem, error, "ensemble") for stem in stems]


def job_state(results: list[dict], cancel_requested: bool = False) -> str:
    """cancelled (the job's cancellation was requested, or a stem stopped for it: stems done by
    then stay stored and reported), else completed (every stem), failed (none), partial (some)."""
    if cancel_requested or any(r.get("status") == "cancelled" for r in results):
        return "cancelled"
    done = sum(1 for r in results if r.get("status") == "completed")
    if done == len(results):
        return "completed"
    return "failed" if done == 0 else "partial"


def flat_results(results: list) -> list[dict]:
    """The chord's results as one list of stem results (an ensemble task returns a list)."""
    return [r for item in results for r in (item if isinstance(item, list) else [item])]


def job_coherence(job: dict, results: list[dict]) -> dict | None:
    """The job's coherence block (stems.analysis.coherence) over its completed stems; None when
    the job has no plan or no analysed stem."""
    record = job.get("plan")
    analyses = {r["stem"]: r["analysis"] for r in results
                if r.get("status") == "completed" and r.get("analysis")}
    if not record or not analyses:
        return None
    source_key = None
    if record.get("source_audio"):
        source_key = parse_key(record["source_audio"]["key"]["key"])
    return coherence(analyses, plan_from_record(record), source_key=source_key)


def callback_payload(job: dict, results: list[dict], state: str, coherence_report: dict | None = None) -> dict:
    """The body POSTed to the backend (documented in docs/api.md and the OpenAPI document)."""
    errors = [f"{r['stem']}: {r['error']}" for r in results if r.get("status") == "failed"]
    return {
        "event": "generation.finished",
        "job_id": job["job_id"],
        "generation_request_id": job["generation_request_id"],
        "audio_file_id": job["audio_file_id"],
        "status": state,
        "stems": results,
        "error": "; ".join(errors) or None,
        "plan": job.get("plan"),
        "coherence": coherence_report,
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
    stemgen_logging.bind(generation_request_id=job.get("generation_request_id"))
    results = flat_results(results)
    state = job_state(results, cancel_requested=job.get("cancel_requested_at") is not None)
    if not jobs.finish(job_id, state, callback_payload(job, results, state, job_coherence(job, results))):
        log.info("job %s was already finished; keeping its first result", job_id)
    else:
        log.info("job %s finished: %s", job_id, state)
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
    stemgen_logging.bind(generation_request_id=job.get("generation_request_id"))
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
