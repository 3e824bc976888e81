"""A job's musical plan and the audio that conditions each generation.

The plan (stems.plan) is made from the request when everything it needs is in it, at submission,
and stored with the job. With ``condition_on_audio`` the plan is the song's (tasks.song_source): its
BPM, its key and the chords of the region's bars, in order; the request's ``target_bpm``, ``key``
and ``chords`` still win and are reported as ``overrides``. The job's analysis step records it once
the song is analysed (the plan made at submission, when the request held all of it, then gains the
song's report, key included).

Conditioning (stems.engine.AudioConditioning) per stem:

| model \\ source | no song | song, ``accompany`` | song, ``continue`` |
|---|---|---|---|
| melody (chroma conditioner) | harmonic stems: chroma of the plan's chords rendered as audio | harmonic stems: chroma of the region's own samples (song-beats grid) or of the region's chords rendered at target_bpm (constant-bpm grid) | every stem continues the seconds before the region |
| text only | none | none (the region's key and chords are in the prompt) | every stem continues the seconds before the region |

Drums are never chroma-conditioned (a chromagram carries harmony, which drums do not play).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from stems.engine import AudioConditioning
from stems.plan import MusicalPlan, bars_for, make_plan, render_chords
from stems.prompts import HARMONIC_STEMS

#: Sample rate of the chord rendition that conditions a melody model, Hz (audiocraft resamples).
CHORD_AUDIO_SAMPLE_RATE = 32000


def plan_known_at_submission(parameters: dict) -> bool:
    """True when the plan does not depend on the song's analysis: no ``condition_on_audio``, or
    a request that gives the tempo and the chords (the key comes from them or is given)."""
    if not parameters.get("condition_on_audio"):
        return True
    return parameters.get("target_bpm") is not None and bool(parameters.get("chords"))


def _bars(parameters: dict, bpm: float, beats_per_bar: int, song: dict | None) -> int:
    if song is not None:
        return int(song["region"]["bars"])
    region = parameters.get("source_region") or {}
    if region.get("bars"):
        return int(region["bars"])
    return bars_for(float(parameters["duration_seconds"]), bpm, beats_per_bar)


def make_job_plan(request: dict, beats_per_bar: int, song: dict | None = None) -> dict:
    """The job's plan record: ``MusicalPlan.to_dict()`` plus, with a song, ``source_audio`` (its
    report: origin, BPM, key with confidence, first downbeat) and ``overrides``.

    Tempo: ``target_bpm``, else the region's. Bars: the region's with a song, else
    ``source_region.bars``, else ``duration_seconds`` in whole bars. Key: ``key``, else from
    ``chords``, else the song's, else chosen from the seed (or, without one, from the
    ``generation_request_id``) and the style. Chords: ``chords``, else the region's bar by bar,
    else from the style table.

    Args:
        request: the validated request (plain JSON). beats_per_bar: 4 for 4/4.
        song: the job's source record (tasks.song_source.analyse), or None.

    Raises:
        stems.plan.PlanError: invalid key or chords (validated at submission already).
        ValueError: no tempo (neither target_bpm nor a song).
    """
    parameters = request["parameters"]
    bpm = parameters.get("target_bpm")
    if bpm is None:
        if song is None:
            raise ValueError("target_bpm is required without source audio")
        bpm = round(song["region"]["bpm"], 2)
    key, chords = parameters.get("key"), parameters.get("chords")
    from_song = []
    if song is not None:
        if key is None and not chords:
            key = song["report"]["key"]["key"]
            from_song.append("key")
        if not chords and song["region"]["chords"]:
            chords = song["region"]["chords"]
            from_song.append("chords")
    plan = make_plan(bpm=float(bpm), bars=_bars(parameters, float(bpm), beats_per_bar, song),
                     beats_per_bar=beats_per_bar, key=key, chords=chords,
                     style=parameters.get("style"), seed=parameters.get("seed"),
                     salt=request["generation_request_id"])
    if "chords" in from_song:
        plan = dataclasses.replace(plan, progression=_cycle(plan.chords))
    if from_song:
        plan = dataclasses.replace(plan, source="source-audio")
    record = plan.to_dict()
    if song is not None:
        record["source_audio"] = song["report"]
        record["overrides"] = _overrides(parameters, song)
    return record


def _cycle(chords: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest cycle that ``chords`` repeat whole (Am F C G Am F C G -> Am F C G; F G C F
    stays as it is)."""
    for period in range(1, len(chords) + 1):
        if len(chords) % period == 0 and all(chords[i] == chords[i % period]
                                             for i in range(len(chords))):
            return chords[:period]
    return chords


def _overrides(parameters: dict, song: dict) -> dict:
    """What the request set in place of the song's own (JSON): ``{"key": {"requested": ...,
    "song": ...}, "chords": ..., "target_bpm": ...}``, only for those given."""
    out = {}
    if parameters.get("key") is not None:
        out["key"] = {"requested": parameters["key"], "song": song["report"]["key"]["key"]}
    if parameters.get("chords"):
        out["chords"] = {"requested": list(parameters["chords"]), "song": song["region"]["chords"]}
    if parameters.get("target_bpm") is not None:
        out["target_bpm"] = {"requested": parameters["target_bpm"], "song": song["region"]["bpm"],
                             "grid": song["grid"]}
    return out


def plan_from_record(record: dict) -> MusicalPlan:
    """The MusicalPlan of a plan record (``make_job_plan``)."""
    return MusicalPlan.from_dict({k: v for k, v in record.items()
                                  if k not in ("source_audio", "overrides")})


@dataclass(frozen=True)
class SongConditioning:
    """The song's samples that condition a job's stems (tasks.song_source's excerpt).

    Attributes:
        kind: "region" (``accompany``: the region itself, time-aligned with the stem) or
            "continuation" (``continue``: the seconds before the region).
        audio: float32 ``[channels, samples]`` at sample_rate (Hz).
        grid: "song-beats" or "constant-bpm". fingerprint: identifies the excerpt.
    """

    kind: str
    audio: np.ndarray
    sample_rate: int
    grid: str
    fingerprint: str


def conditioning_for(stem: str | None, plan: MusicalPlan, *, melody_model: bool,
                     song: SongConditioning | None = None) -> AudioConditioning | None:
    """The audio conditioning of one generation (see the module's table).

    Args:
        stem: the stem, or None for an ensemble generation (which plays harmony).
        plan: the job's plan. melody_model: the worker's model has a chroma conditioner.
        song: the job's song excerpt, or None.
    """
    harmonic = stem is None or stem in HARMONIC_STEMS
    if song is not None and song.kind == "continuation":
        return AudioConditioning("continuation", song.audio, song.sample_rate,
                                 f"song-before-region:{song.fingerprint}")
    if not (melody_model and harmonic):
        return None
    if song is not None and song.grid == "song-beats":
        return AudioConditioning("chroma", song.audio, song.sample_rate,
                                 f"song-region:{song.fingerprint}")
    fingerprint = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()
    return AudioConditioning("chroma", render_chords(plan, CHORD_AUDIO_SAMPLE_RATE),
                             CHORD_AUDIO_SAMPLE_RATE, f"plan:{fingerprint}")
