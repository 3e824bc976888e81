"""Celery tasks: with ``condition_on_audio``, first ``analyse_source`` (the song analysed once per
job, tasks.song_source); then one ``generate_stem`` per stem (or one ``generate_ensemble`` for all stems of an
ensemble request) in a chord (sent by the outbox dispatcher, ``send_job_chord``) whose body is
``finalize_request``, which hands the callback to
``deliver_callback`` (tasks.callback_delivery).

Tasks hold no audio logic: they call stems/ (generate, render) and storage/ (upload).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import dataclasses
from dataclasses import dataclass

import hashlib

import numpy as np
import redis
from celery import chain, chord
from celery.utils.time import get_exponential_backoff_interval

import stemgen_logging
from stems.analysis import chord_fit, coherence, key_agreement, stem_analysis
from stems.audio import OutputSpec
from stems.batching import GenerationCancelled
from stems.engine import SamplingParams
from stems.plan import MusicalPlan, parse_key
from stems.warping import conform_to_beats
from stems.prompts import HARMONIC_STEMS, build_ensemble_prompt, build_stem_prompt
from stems.render import conform_clip, finish_stem
from stems.separation import stem_energy_db
from storage import StorageUnavailable, blob_name_for, store_from_settings
from tasks import metrics
from tasks.app import app
from tasks.callback_delivery import deliver_callback
from tasks.jobstore import JobStore
from tasks.model_cache import decoding_precision, get_batcher, get_separator
from tasks import song_source
from tasks.planning import SongConditioning, conditioning_for, make_job_plan, plan_from_record
from tasks.source_audio import SourceAudioError, load_source
from tasks.worker_jobstore import JOBSTORE_RETRIES, JOBSTORE_UNREACHABLE, job_store

log = logging.getLogger(__name__)

STORAGE_MAX_RETRIES = 3


class ModelNotHeld(RuntimeError):
    """A generation task reached a worker that holds another model than the job asked for (a
    deployment whose workers of two models consume one queue)."""


#: How often a stem task that reached a worker of another model is sent on to its model's queue
#: before its stems fail (a queue consumed by the wrong model's workers would pass it around).
MODEL_REQUEUES = 3


def _send_to_model_queue(task, settings, request: dict) -> str | None:
    """When this worker holds another model than the job asked for, send the task to the queue of
    that model (``task.retry`` to ``stems_queue_for(model)``; raises celery's Retry), at most
    MODEL_REQUEUES times; then the reason its stems fail. None when this worker holds the model."""
    wanted = request["parameters"].get("model")
    if not wanted or wanted == settings.musicgen_model:
        return None
    reason = f"ModelNotHeld: this worker holds {settings.musicgen_model}, the job asked for {wanted}"
    if task.request.retries >= MODEL_REQUEUES:
        return f"{reason} (sent on {MODEL_REQUEUES} times)"
    queue = settings.stems_queue_for(wanted)
    log.warning("%s: sending the task to queue %s", reason, queue)
    raise task.retry(queue=queue, countdown=1, max_retries=task.request.retries + 1)


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
    ``generate_ensemble`` for all of them; with ``condition_on_audio``, chained after
    ``analyse_source`` (the song analysed once for the job). ``job`` is its record (JobStore.get). Called by the
    outbox dispatcher (tasks.dispatcher), not on the gateway's request path.

    Raises:
        kombu.exceptions.OperationalError (and the transport's errors): the broker is unreachable.
    """
    job_id, request = job["job_id"], job["request"]
    if job.get("owner"):  # whose source songs the tasks may read (tasks.source_audio)
        request = {**request, "owner": job["owner"]}
    stems = [state["stem"] for state in job["stems"]]
    settings = app.stemgen_settings
    # the queue of the workers holding the job's model (one queue per served model)
    queue = settings.stems_queue_for(request["parameters"].get("model") or settings.served_models[0])
    # immutable signatures: after analyse_source, the stems read the song's analysis from the job
    if request["parameters"].get("arrangement") == "ensemble":
        header = [generate_ensemble.si(job_id, stems, request).set(queue=queue)]
    else:
        header = [generate_stem.si(job_id, stem, request).set(queue=queue) for stem in stems]
    stems_chord = chord(header, finalize_request.s(job_id))
    if request["parameters"].get("condition_on_audio"):  # the song analysed once, first
        chain(analyse_source.si(job_id, request).set(queue=queue), stems_chord).apply_async()
    else:
        stems_chord.apply_async()


@app.task(bind=True, name="stemgen.analyse_source", max_retries=STORAGE_MAX_RETRIES)
def analyse_source(self, job_id: str, request: dict) -> str:
    """The job's first step with ``condition_on_audio``: fetch, decode and analyse the song once,
    resolve the region, make the plan and record them with the job (tasks.song_source); the
    stems' chord follows (``send_job_chord``). Never fails the chain: a song or region that
    cannot be used is recorded as the source's error, with which every stem then fails at once
    (never retried). Retried only while storage or the job store is unreachable.

    Returns:
        "analysed", "failed" (the recorded error) or "cancelled".
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    try:
        if jobs.cancel_requested(job_id):  # the stems stop on their own; nothing to analyse for
            return "cancelled"
        song = jobs.source_of(job_id)
        if song is None:
            started = time.perf_counter()
            song = _analyse_and_record(jobs, job_id, request, settings)
            log.info("song of job %s analysed in %.2fs", job_id, time.perf_counter() - started)
        return "failed" if song.get("error") else "analysed"
    except (StorageUnavailable, *JOBSTORE_UNREACHABLE) as exc:
        retry = _retry_later(self, settings, exc, f"{job_id} (song analysis)")
        if retry is None:
            jobs.record_source(job_id, {"error": str(exc)}, None)
            return "failed"
        raise retry
    except Exception as exc:  # recorded: the stems fail with it (see docstring)
        log.exception("song analysis of job %s failed", job_id)
        jobs.record_source(job_id, {"error": f"{exc.__class__.__name__}: {exc}"}, None)
        return "failed"


def _analyse_and_record(jobs: JobStore, job_id: str, request: dict, settings) -> dict:
    """Fetch, decode and analyse the job's song, make its plan and record both (first wins);
    the recorded source. A song or region that cannot be used is recorded as the source's
    ``error`` (the stems then fail with it, never retried).

    Raises:
        StorageUnavailable: the song's storage cannot be reached (retried by the caller).
    """
    try:
        source = load_source(request, settings)
        record, excerpt = song_source.analyse(source, request, settings)
    except SourceAudioError as exc:  # (SongRegionError included: it names its field)
        return jobs.record_source(job_id, {"error": str(exc),
                                           "field": getattr(exc, "field", None)}, None)
    plan = make_job_plan(request, settings.beats_per_bar, record)
    return jobs.record_source(job_id, record, plan, excerpt)


def _job_song(jobs: JobStore, job_id: str, request: dict, settings) -> dict | None:
    """The job's analysed song (tasks.song_source), or None without ``condition_on_audio``. It is
    analysed by the job's ``analyse_source`` step; a stem that finds no analysis (a job sent
    before that step existed) makes it here, once for the job.

    Raises:
        SourceAudioError: the song or its region could not be used (the stem fails, no retry).
    """
    if not request["parameters"].get("condition_on_audio"):
        return None
    song = jobs.source_of(job_id)
    if song is None:
        song = _analyse_and_record(jobs, job_id, request, settings)
    if song.get("error"):
        raise SourceAudioError(song["error"])
    return song


def _song_conditioning(jobs: JobStore, job_id: str, song: dict | None) -> SongConditioning | None:
    """The job's stored excerpt of the song (tasks.song_source), or None."""
    if song is None:
        return None
    data = jobs.source_excerpt(job_id)
    if data is None:
        raise SourceAudioError("the song's excerpt is gone from the job store (expired job?)")
    audio, rate = song_source.decode_excerpt(data)
    kind = "continuation" if song["excerpt"]["kind"] == "continuation" else "region"
    return SongConditioning(kind, audio, rate, song["grid"], hashlib.sha256(data).hexdigest())


def _conditioning_report(conditioning, song: dict | None) -> dict | None:
    """What conditioned a generation, taken at the engine's boundary: the kind, where its audio
    came from, and the SHA-256 of the float32 samples handed to the model."""
    if conditioning is None:
        return None
    audio = np.ascontiguousarray(conditioning.audio, dtype=np.float32)
    origin = conditioning.fingerprint.split(":", 1)[0]
    report = {"kind": conditioning.kind, "origin": origin, "sample_rate": conditioning.sample_rate,
              "channels": int(audio.shape[0]), "samples": int(audio.shape[1]),
              "sha256": hashlib.sha256(audio.tobytes()).hexdigest()}
    if song is not None and origin.startswith("song-"):
        report["start_sample"] = song["excerpt"]["start_sample"]
        report["end_sample"] = song["excerpt"]["end_sample"]
    return report


def _stem_bars(plan: MusicalPlan, song: dict | None) -> MusicalPlan:
    """The plan on the stem's own bars, for its analysis: on the song's beats a stem's bars are
    the region's, whose mean tempo is exactly ``bars / (end - start)`` (the plan's BPM is rounded)."""
    if song is None or song["grid"] != song_source.GRID_SONG:
        return plan
    region = song["region"]
    seconds = region["end_seconds"] - region["start_seconds"]
    return dataclasses.replace(plan, bpm=plan.bars * plan.beats_per_bar * 60.0 / seconds)


def _song_plan(plan: MusicalPlan, song: dict) -> MusicalPlan:
    """The stem's bars with the song's own chords and key (what the stem is measured against)."""
    chords = tuple(song["region"]["chords"]) or plan.chords
    return dataclasses.replace(plan, key=parse_key(song["report"]["key"]["key"]),
                               chords=chords, progression=chords)


def _vs_song(rendered, plan: MusicalPlan, song: dict, analysis: dict) -> dict:
    """A harmonic stem against the song: its key against the song's key and its per-bar chord
    fit against the region's chords (the same bars as the plan's)."""
    song_plan = _song_plan(plan, song)
    stem_key = analysis.get("key")
    agreement = (key_agreement(parse_key(stem_key["key"]), song_plan.key) if stem_key else None)
    if song_plan.chords == plan.chords:
        fit = analysis["chord_fit"]
    else:
        fit = chord_fit(rendered.audio, rendered.sample_rate, song_plan).to_dict()
    return {"song_key": song_plan.key.name, "key_vs_song": agreement,
            "song_chords": list(song_plan.chords), "chord_fit": fit}


def _store_stem(settings, jobs: JobStore, job_id: str, request: dict, stem: str, rendered,
                plan: MusicalPlan, song: dict | None = None, anchors: np.ndarray | None = None,
                **extra) -> dict:
    """Analyse a rendered stem against the plan (and the song), upload it, record it completed;
    its result. The blob's extension and content type, and the result's format fields, are the
    rendered file's (parameters.output). ``anchors``: the beat map the stem was warped onto
    (seconds from its start), reported as ``tempo.song_beats_seconds``.

    When storage is unreachable the rendered file and its result are kept in the job store
    (JobStore.stage_rendered, bounded by STAGED_STEM_MAX_BYTES and STAGED_STEM_TTL_SECONDS)
    before StorageUnavailable propagates: the task's retry, on whichever worker, uploads the kept
    file (``_upload_stem``) instead of generating the stem again.

    Raises:
        StorageUnavailable: storage unreachable (the render is kept when within the bounds).
    """
    bars = _stem_bars(plan, song)
    analysis = stem_analysis(rendered.audio, rendered.sample_rate, bars,
                             harmonic=stem in HARMONIC_STEMS)
    if song is not None and analysis.get("harmonic"):
        analysis["vs_song"] = _vs_song(rendered, bars, song, analysis)
    metadata = rendered.metadata()
    warnings = list(extra.pop("warnings", None) or []) + metadata.pop("warnings", [])
    result = {"stem": stem, "status": "completed", "bpm": plan.bpm,
              "model": settings.musicgen_model,
              # a seeded request repeats exactly only at the same precision (docs/decoding.md)
              "precision": decoding_precision(settings.musicgen_model), **extra,
              **metadata, "analysis": analysis}
    if song is not None:
        result["source_region"] = song_source.result_region(song)
        if anchors is not None and isinstance(result.get("tempo"), dict):
            result["tempo"]["song_beats_seconds"] = [round(float(t), 6) for t in anchors]
    if warnings or "silent" in extra:  # (an ensemble stem always lists its warnings)
        result["warnings"] = warnings
    upload = {"blob_name": blob_name_for(job_id, stem, rendered.extension),
              "content_type": rendered.content_type,
              "duration_seconds": rendered.duration_seconds,
              "metadata": {"stem": stem, "bpm": f"{plan.bpm:g}", "format": rendered.extension,
                           "sample_rate": str(rendered.sample_rate),
                           "duration_seconds": f"{rendered.duration_seconds:.6f}",
                           "key": plan.key.name, "model": settings.musicgen_model,
                           "generation_request_id": request["generation_request_id"]}}
    try:
        return _upload_stem(settings, jobs, job_id, stem, rendered.data, upload, result)
    except StorageUnavailable:
        kept = jobs.stage_rendered(job_id, stem, rendered.data, {"upload": upload, "result": result},
                                   max_bytes=settings.staged_stem_max_bytes,
                                   ttl_seconds=settings.staged_stem_ttl_seconds)
        log.warning("upload of %s/%s failed; its render (%d bytes) is %s", job_id, stem,
                    len(rendered.data), "kept for the retry" if kept else
                    "not kept (over STAGED_STEM_MAX_BYTES): the retry generates it again")
        raise


def _upload_stem(settings, jobs: JobStore, job_id: str, stem: str, data: bytes, upload: dict,
                 result: dict) -> dict:
    """Upload a stem's file, record the stem completed with its ``result`` (and the blob's name
    and URL) and forget its kept render; the result.

    Raises:
        StorageUnavailable.
    """
    stored = store_from_settings(settings).upload(
        upload["blob_name"], data, content_type=upload["content_type"], metadata=upload["metadata"])
    result = {"stem": stem, "status": "completed", "blob_name": stored.blob_name, "url": stored.url,
              **{k: v for k, v in result.items() if k not in ("stem", "status")}}
    details = {k: v for k, v in result.items() if k not in ("stem", "status")}
    jobs.update_stem(job_id, stem, "completed", 1.0, **details)
    jobs.drop_staged(job_id, stem)
    metrics.stem_completed(stem, result.get("arrangement", "independent"), upload["duration_seconds"])
    return result


def _upload_kept(settings, jobs: JobStore, job_id: str, stem: str) -> dict | None:
    """The result of a stem whose render was kept after a failed upload, uploaded now (no
    generation); None when none is kept.

    Raises:
        StorageUnavailable.
    """
    kept = jobs.staged_rendered(job_id, stem)
    if kept is None:
        return None
    data, details = kept
    log.info("stem %s of job %s: uploading its kept render, without generating it again", stem, job_id)
    metrics.kept_render_uploaded(stem)
    return _upload_stem(settings, jobs, job_id, stem, data, details["upload"], details["result"])


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
    song: dict | None           # the job's analysed song (tasks.song_source), or None
    conditioning_audio: dict | None  # _conditioning_report


def _stem_seconds(parameters: dict, plan: MusicalPlan, song: dict | None) -> float:
    """The finished stem's length, seconds: the region's on the song's beats, the plan's bars at
    its tempo on a constant grid with a song, else the requested duration."""
    if song is None:
        return float(parameters["duration_seconds"])
    if song["grid"] == song_source.GRID_SONG:
        return song["region"]["end_seconds"] - song["region"]["start_seconds"]
    return plan.bars * plan.bar_seconds()


def _conform(made: "_Generation", parameters: dict, settings) -> tuple:
    """The generation on the job's grid: (stems.warping.ConformResult, the beat map it was warped
    onto or None). On the song's beats: warped onto its beat map over the region
    (stems.warping.conform_to_beats, beats in seconds from the region's first downbeat);
    otherwise conformed to the plan's BPM in whole bars (stems.render.conform_clip)."""
    loop = bool(parameters.get("loop", False))
    song = made.song
    if song is not None and song["grid"] == song_source.GRID_SONG:
        region = song["region"]
        anchors = np.asarray(region["beats"], dtype=np.float64) - region["beats"][0]
        return conform_to_beats(made.audio, made.sample_rate, anchors, bars=region["bars"],
                                loop=loop, beats_per_bar=settings.beats_per_bar), anchors
    return conform_clip(made.audio, made.sample_rate, bpm=made.plan.bpm,
                        duration_seconds=_stem_seconds(parameters, made.plan, song),
                        beats_per_bar=settings.beats_per_bar, loop=loop), None


def _generate(settings, jobs: JobStore, job_id: str, request: dict, stems: list[str], *,
              ensemble: bool, progress) -> _Generation:
    """The steps both tasks share: take the job's analysed song (if any) and plan, build the
    prompt (one stem's, or the ensemble's for ``stems``), choose the conditioning and generate
    through the worker's batcher."""
    parameters = request["parameters"]
    wanted = parameters.get("model")
    if wanted and wanted != settings.musicgen_model:  # a queue shared by two models' workers
        raise ModelNotHeld(f"this worker holds {settings.musicgen_model}, the job asked for {wanted}")
    batcher = get_batcher(settings)
    engine = batcher.engine
    song = _job_song(jobs, job_id, request, settings)
    plan = plan_from_record(jobs.get(job_id)["plan"])
    text = dict(style=parameters.get("style"), prompt=parameters.get("prompt"),
                harmony=plan.prompt_text())
    if ensemble:
        prompt = build_ensemble_prompt(stems, plan.bpm, **text)
    else:
        prompt = build_stem_prompt(stems[0], plan.bpm, **text)
    conditioning = conditioning_for(None if ensemble else stems[0], plan,
                                    melody_model=engine.supports_melody,
                                    song=_song_conditioning(jobs, job_id, song))
    started = time.perf_counter()
    # Stems of one request (and compatible concurrent requests) share one MusicGen call.
    with _cancel_watch(jobs, job_id, settings.cancel_poll_seconds) as cancel:
        audio = batcher.generate(
            prompt, _stem_seconds(parameters, plan, song) + settings.generation_margin_seconds,
            sampling=sampling_params(parameters, settings), seed=parameters.get("seed"),
            progress=progress, conditioning=conditioning, cancel=cancel)
    seconds = time.perf_counter() - started
    metrics.generation_done(batcher, settings.musicgen_model,
                            "ensemble" if ensemble else "independent", seconds)
    return _Generation(audio, engine.sample_rate, engine.device, plan, prompt,
                       conditioning.kind if conditioning else None, seconds, song,
                       _conditioning_report(conditioning, song))


@app.task(bind=True, name="stemgen.generate_stem", max_retries=STORAGE_MAX_RETRIES)
def generate_stem(self, job_id: str, stem: str, request: dict) -> dict:
    """Generate, conform, encode and upload one stem; return its result dict (never raises for a
    failed generation: the failure is the result, so the chord's finalize always runs).

    The prompt carries the plan's key and chords; a melody model is conditioned on the plan's
    chords or the song's region, and with ``source_mode: "continue"`` every model continues the
    bars before the region (tasks.planning). With a song the stem is warped onto its beat map
    over the region, or conformed to a constant grid at another target_bpm (``_conform``).
    Retried (Celery ``self.retry``, exponential backoff) only when storage is unreachable; sent
    to its model's queue when it reached a worker of another model; a render whose upload failed
    is kept, and its retry uploads it without generating again (``_store_stem``).
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    parameters = request["parameters"]
    not_held = _send_to_model_queue(self, settings, request)
    if not_held:
        return _failed(jobs, job_id, stem, not_held)
    try:
        if jobs.cancel_requested(job_id):  # cancelled while queued: never starts
            return _cancelled(jobs, job_id, stem)
        kept = _upload_kept(settings, jobs, job_id, stem)  # rendered before, its upload failed
        if kept is not None:
            return kept
        output = OutputSpec.from_dict(parameters.get("output"))
        jobs.count_run(job_id, stem)
        jobs.update_stem(job_id, stem, "running", 0.0)
        reporter = _ProgressReporter(jobs, job_id, stem, span=0.9)
        try:
            made = _generate(settings, jobs, job_id, request, [stem], ensemble=False,
                             progress=reporter)
        except GenerationCancelled:
            return _cancelled(jobs, job_id, stem, max(reporter.last, 0.0))
        conformed, anchors = _conform(made, parameters, settings)
        rendered = finish_stem(conformed.audio, made.sample_rate, conformed.analysis,
                               target_lufs=settings.target_lufs,
                               max_true_peak_dbtp=settings.max_true_peak_dbtp, output=output,
                               loop=bool(parameters.get("loop", False)))
        jobs.update_stem(job_id, stem, "running", 0.95)
        return _store_stem(settings, jobs, job_id, request, stem, rendered, made.plan, made.song,
                           anchors, device=made.device, prompt=made.prompt, conditioning=made.conditioning,
                           **_generation_extra(made))
    except (StorageUnavailable, *JOBSTORE_UNREACHABLE) as exc:
        retry = _retry_later(self, settings, exc, f"{job_id}/{stem}")
        if retry is None:
            return _failed(jobs, job_id, stem, str(exc))
        raise retry
    except Exception as exc:  # the failure becomes the stem's result; see docstring
        log.exception("stem %s of job %s failed", stem, job_id)
        return _failed(jobs, job_id, stem, f"{exc.__class__.__name__}: {exc}")


def _generation_extra(made: _Generation) -> dict:
    """The result fields that say how a stem was generated (besides device and prompt)."""
    extra = {"generation_seconds": round(made.seconds, 3)}
    if made.conditioning_audio is not None:
        extra["conditioning_audio"] = made.conditioning_audio
    return extra


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
    results: dict[str, dict] = {}
    not_held = _send_to_model_queue(self, settings, request)
    if not_held:
        return [_failed(jobs, job_id, stem, not_held, "ensemble") for stem in stems]
    try:
        if jobs.cancel_requested(job_id):  # cancelled while queued: never starts
            return [_cancelled(jobs, job_id, stem) for stem in stems]
        done = _ensemble_done_or_kept(settings, jobs, job_id, stems)
        if done is not None:  # every stem stored, or kept after a failed upload: no generation
            return done
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
        conformed, anchors = _conform(made, parameters, settings)
        started = time.perf_counter()
        separator = get_separator(settings)
        parts = separator.separate(conformed.audio, rate, stems)
        separation_seconds = time.perf_counter() - started
        unstored: StorageUnavailable | None = None
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
            try:
                results[stem] = _store_stem(
                    settings, jobs, job_id, request, stem, rendered, made.plan, made.song, anchors,
                    device=made.device, prompt=made.prompt, arrangement="ensemble",
                    conditioning=made.conditioning, **_generation_extra(made),
                    separation={"model": settings.separation_model, "level_db": round(level_db, 2),
                                "seconds": round(separation_seconds, 3)},
                    silent=silent, warnings=warnings)
            except StorageUnavailable as exc:  # the render is kept: render and keep the others
                unstored = unstored or exc
        if unstored is not None:
            raise unstored
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


def _ensemble_done_or_kept(settings, jobs: JobStore, job_id: str, stems: list[str]) -> list[dict] | None:
    """The ensemble's results without generating again, when each stem is either recorded
    completed or kept after a failed upload (then uploaded now); None otherwise.

    Raises:
        StorageUnavailable.
    """
    recorded = {state["stem"]: state for state in jobs.get(job_id)["stems"]}
    kept = {stem for stem in stems if recorded.get(stem, {}).get("status") != "completed"}
    if not kept or not all(jobs.staged_rendered(job_id, stem) is not None for stem in kept):
        return None
    results = []
    for stem in stems:
        if stem in kept:
            results.append(_upload_kept(settings, jobs, job_id, stem))
        else:
            results.append({k: v for k, v in recorded[stem].items() if k != "progress"})
    return results


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
    block = coherence(analyses, plan_from_record(record), source_key=source_key)
    fits = []
    for name, analysis in analyses.items():  # with a song: each harmonic stem against its chords
        vs_song = analysis.get("vs_song")
        if vs_song:
            block["song_chords"] = vs_song["song_chords"]
            block["stems"][name]["chord_fit_vs_song"] = vs_song["chord_fit"]["mean"]
            block["stems"][name]["chord_fit_vs_song_per_bar"] = vs_song["chord_fit"]["per_bar"]
            fits.append(vs_song["chord_fit"]["mean"])
    if fits:
        block["mean_chord_fit_vs_song"] = round(float(np.mean(fits)), 3)
    return block


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
        metrics.job_finished(state)
    jobs.drop_source_excerpt(job_id)  # the song's samples were for the stems only
    job = jobs.get(job_id)
    if job["callback"]["url"] and not job["delivery_enqueued"]:
        deliver_callback.delay(job_id)
        jobs.mark_delivery_enqueued(job_id)
    return {"job_id": job_id, "status": job["status"]}
