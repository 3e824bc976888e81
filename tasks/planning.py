"""A job's musical plan and the audio that conditions each generation.

The plan (stems.plan) is made from the request when everything it needs is in it, at submission,
and stored with the job. With ``condition_on_audio`` and no ``target_bpm`` or no key/chords, the
plan needs the source's tempo and key: the first stem task that analysed the source records it
(``JobStore.claim_plan``) and every stem of the job follows that one.

Conditioning (stems.engine.AudioConditioning) per stem:

| model \\ source | no source audio | source audio |
|---|---|---|
| melody (chroma conditioner) | harmonic stems: chroma of the plan's chords rendered as audio | harmonic stems: chroma of the source |
| text only | none | every stem continues the source's last seconds |

Drums are never chroma-conditioned (a chromagram carries harmony, which drums do not play).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from stems.engine import AudioConditioning
from stems.plan import MusicalPlan, bars_for, make_plan, render_chords
from stems.prompts import HARMONIC_STEMS

#: Sample rate of the chord rendition that conditions a melody model, Hz (audiocraft resamples).
CHORD_AUDIO_SAMPLE_RATE = 32000


def plan_known_at_submission(parameters: dict) -> bool:
    """True when the plan does not depend on the source audio's analysis."""
    if not parameters.get("condition_on_audio"):
        return True
    return parameters.get("target_bpm") is not None and bool(parameters.get("key") or parameters.get("chords"))


def make_job_plan(request: dict, beats_per_bar: int, source=None) -> dict:
    """The job's plan record: ``MusicalPlan.to_dict()`` plus ``source_audio`` (the source's
    analysis, when conditioned on one).

    Tempo: ``target_bpm``, else the source's. Key: ``key``, else from ``chords``, else the
    source's (with its confidence in ``source_audio``), else chosen from the seed (or, without
    one, from the ``generation_request_id``) and the style.

    Args:
        request: the validated request (plain JSON). beats_per_bar: 4 for 4/4.
        source: tasks.source_audio.SourceAudio, or None.

    Raises:
        stems.plan.PlanError: invalid key or chords (validated at submission already).
        ValueError: no tempo (neither target_bpm nor a source).
    """
    parameters = request["parameters"]
    bpm = parameters.get("target_bpm")
    if bpm is None:
        if source is None:
            raise ValueError("target_bpm is required without source audio")
        bpm = round(source.bpm, 2)
    key = parameters.get("key")
    key_from_source = key is None and not parameters.get("chords") and source is not None
    if key_from_source:
        key = source.key.key.name
    plan = make_plan(bpm=float(bpm), bars=bars_for(float(parameters["duration_seconds"]), float(bpm),
                                                    beats_per_bar),
                     beats_per_bar=beats_per_bar, key=key, chords=parameters.get("chords"),
                     style=parameters.get("style"), seed=parameters.get("seed"),
                     salt=request["generation_request_id"])
    if key_from_source:
        plan = dataclasses.replace(plan, source="source-audio")
    record = plan.to_dict()
    if source is not None:
        record["source_audio"] = source.report()
    return record


def plan_from_record(record: dict) -> MusicalPlan:
    """The MusicalPlan of a plan record (``make_job_plan``)."""
    return MusicalPlan.from_dict({k: v for k, v in record.items() if k != "source_audio"})


def conditioning_for(stem: str | None, plan: MusicalPlan, *, melody_model: bool, source=None,
                     settings=None) -> AudioConditioning | None:
    """The audio conditioning of one generation (see the module's table).

    Args:
        stem: the stem, or None for an ensemble generation (which plays harmony).
        plan: the job's plan. melody_model: the worker's model has a chroma conditioner.
        source: tasks.source_audio.SourceAudio, or None.
        settings: needed with a source (SOURCE_PROMPT_SECONDS, SOURCE_CHROMA_SECONDS).
    """
    harmonic = stem is None or stem in HARMONIC_STEMS
    if source is not None:
        if melody_model:
            if not harmonic:
                return None
            return AudioConditioning("chroma", source.head(settings.source_chroma_seconds),
                                     source.sample_rate, f"source-head:{source.fingerprint}")
        return AudioConditioning("continuation", source.tail(settings.source_prompt_seconds),
                                 source.sample_rate, f"source-tail:{source.fingerprint}")
    if melody_model and harmonic:
        fingerprint = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()
        return AudioConditioning("chroma", render_chords(plan, CHORD_AUDIO_SAMPLE_RATE),
                                 CHORD_AUDIO_SAMPLE_RATE, f"plan:{fingerprint}")
    return None
