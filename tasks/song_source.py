"""The user's song, analysed once per job, before its stems (``condition_on_audio``).

The job's first step (``tasks.stem_tasks.analyse_source``, a Celery chain step ahead of the stems'
chord) fetches and decodes the song (tasks.source_audio), analyses it (stems.song.analyse_song:
beats, downbeats, chords per bar, key), resolves ``parameters.source_region`` to bars of the song
and makes the job's plan from the region. What it stores with the job (JobStore.record_source):

- the source record (``source_record``): the song's report, its analysis, the region (start in the
  song's time, bars, beat map, chords) and the grid the stems follow;
- the plan (tasks.planning.make_job_plan with the region): the song's BPM, key and the region's
  chords, with any ``key``/``chords``/``target_bpm`` of the request reported as overrides;
- the conditioning excerpt: the song's own samples the stems are conditioned on (the region for
  ``accompany``, the seconds before it for ``continue``), losslessly as FLAC, so the stem tasks
  neither fetch nor analyse the song again.

Grid: ``"song-beats"`` (the stems are warped onto the song's beat map over the region) unless the
request's ``target_bpm`` differs from the song's by more than ``SAME_TEMPO_TOLERANCE``: then
``"constant-bpm"`` at ``target_bpm`` (the song must be stretched to that tempo to fit them).

A region that the song does not have (past its end, longer than MAX_DURATION_SECONDS) or a
``continue`` with nothing before the region is a ``SongRegionError`` naming the field: the job
fails with it and is never retried.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from stems.plan import PlanError, bars_for, parse_chord
from stems.song import RegionError, SongAnalysis, analyse_song
from tasks.source_audio import SourceAudio, SourceAudioError

#: A target_bpm within this fraction of the song's tempo keeps the song's own beat map.
SAME_TEMPO_TOLERANCE = 0.01
#: Least song before the region that ``source_mode: "continue"`` can continue, seconds.
MIN_CONTINUATION_SECONDS = 1.0
GRID_SONG = "song-beats"
GRID_CONSTANT = "constant-bpm"


class SongRegionError(SourceAudioError):
    """The request's region does not fit the song (never retried); ``field`` names the
    request field, e.g. "parameters.source_region.start_bar"."""

    def __init__(self, message: str, field: str = "parameters.source_region"):
        super().__init__(f"{field}: {message}")
        self.field = field


def region_bars(parameters: dict, bpm: float, beats_per_bar: int) -> int:
    """Bars of the region: ``source_region.bars``, else ``duration_seconds`` in whole bars at
    ``bpm`` (BPM: the stems' tempo), at least one."""
    region = parameters.get("source_region") or {}
    if region.get("bars"):
        return int(region["bars"])
    return bars_for(float(parameters["duration_seconds"]), bpm, beats_per_bar)


def start_bar(analysis: SongAnalysis, region: dict) -> int:
    """The region's first bar (1 = the bar at the song's first downbeat): ``start_bar``, or the
    downbeat nearest ``start_seconds``, or 1."""
    if region.get("start_bar") is not None:
        return int(region["start_bar"])
    if region.get("start_seconds") is not None:
        try:
            return analysis.bar_at(float(region["start_seconds"]))
        except RegionError as exc:
            raise SongRegionError(str(exc), "parameters.source_region.start_seconds") from None
    return 1


def plan_chords(names) -> list[str]:
    """The region's chords as plan chords, one per bar: a bar with no chord ("N") or a chord the
    plan cannot name keeps the chord before it (the first such bars take the first named one)."""
    out: list[str | None] = []
    for name in names:
        try:
            out.append(parse_chord(str(name)).name if name not in (None, "N", "") else None)
        except PlanError:
            out.append(None)
    known = [c for c in out if c]
    if not known:
        return []
    last = known[0]
    for i, chord in enumerate(out):
        last = chord or last
        out[i] = last
    return out  # type: ignore[return-value]


def resolve_region(analysis: SongAnalysis, parameters: dict, settings) -> dict:
    """The region of the song the stems are for, as stored with the job (JSON).

    Returns:
        ``{"start_bar", "bars", "start_seconds", "end_seconds", "first_downbeat_seconds", "bpm",
        "beats" (song time, seconds, the region's downbeat first and its end last), "chords"
        (one per bar)}``.

    Raises:
        SongRegionError: past the song's end, longer than MAX_DURATION_SECONDS.
    """
    beats_per_bar = settings.beats_per_bar
    asked = parameters.get("source_region") or {}
    first = start_bar(analysis, asked)
    field = ("parameters.source_region.start_seconds" if asked.get("start_seconds") is not None
             else "parameters.source_region.start_bar")
    # duration_seconds is the stem's length: in bars at the stems' tempo (target_bpm, else the song's)
    bars = region_bars(parameters, float(parameters.get("target_bpm") or analysis.bpm), beats_per_bar)
    count = analysis.bar_count
    if asked.get("start_seconds") is not None and asked["start_seconds"] > analysis.duration_seconds:
        raise SongRegionError(f"{asked['start_seconds']:g} s is past the song's end "
                              f"({analysis.duration_seconds:.1f} s)", field)
    if first > count:
        raise SongRegionError(f"bar {first} is past the song's end: it has {count} bars", field)
    if first + bars - 1 > count:
        length_field = ("parameters.source_region.bars" if asked.get("bars")
                        else "parameters.duration_seconds")
        raise SongRegionError(f"bars {first}..{first + bars - 1} run past the song's end: it has "
                              f"{count} bars", length_field)
    try:
        region = analysis.region(first, bars)
    except RegionError as exc:
        raise SongRegionError(str(exc), getattr(exc, "field", None) or field) from None
    seconds = region.end_seconds - region.start_seconds
    if seconds > settings.max_duration_seconds:
        raise SongRegionError(f"{bars} bars of the song last {seconds:.1f} s, more than "
                              f"{settings.max_duration_seconds:g} s (MAX_DURATION_SECONDS)",
                              "parameters.source_region.bars")
    chords = plan_chords(region.chords)
    return {"start_bar": first, "bars": bars,
            "start_seconds": round(float(region.start_seconds), 6),
            "end_seconds": round(float(region.end_seconds), 6),
            "first_downbeat_seconds": round(float(analysis.downbeats[0]), 6),
            "bpm": round(float(region.bpm), 3),
            "beats": [round(float(t), 6) for t in region.beats],
            "chords": chords}


def grid_for(parameters: dict, song_bpm: float) -> str:
    """"song-beats", or "constant-bpm" when the request's target_bpm is not the song's tempo."""
    target = parameters.get("target_bpm")
    if target is None or abs(float(target) - song_bpm) <= SAME_TEMPO_TOLERANCE * song_bpm:
        return GRID_SONG
    return GRID_CONSTANT


def excerpt_span(region: dict, parameters: dict, source: SourceAudio, settings) -> tuple[int, int]:
    """Sample indices ``[start, end)`` of the song that condition the stems: the region itself
    (``accompany``), or the ``SOURCE_PROMPT_SECONDS`` before it (``continue``).

    Raises:
        SongRegionError: ``continue`` with less than MIN_CONTINUATION_SECONDS before the region.
    """
    rate = source.sample_rate
    start = int(round(region["start_seconds"] * rate))
    if parameters.get("source_mode") == "continue":
        if region["start_seconds"] < MIN_CONTINUATION_SECONDS:
            raise SongRegionError(
                f"\"continue\" needs at least {MIN_CONTINUATION_SECONDS:g} s of the song before the "
                f"region, which starts at {region['start_seconds']:.2f} s; choose a later start "
                "or \"accompany\"", "parameters.source_mode")
        return max(0, start - int(round(settings.source_prompt_seconds * rate))), start
    end = min(source.audio.shape[1], int(round(region["end_seconds"] * rate)))
    return start, end


def encode_excerpt(audio: np.ndarray, sample_rate: int, subtype: str) -> bytes:
    """FLAC of ``audio`` (float32 ``[channels, samples]``) at the source file's PCM depth, so a
    16- or 24-bit source's samples come back exactly (``decode_excerpt``)."""
    out = io.BytesIO()
    sf.write(out, np.ascontiguousarray(audio.T), sample_rate, format="FLAC",
             subtype=subtype if subtype in ("PCM_16", "PCM_24") else "PCM_24")
    return out.getvalue()


def decode_excerpt(data: bytes) -> tuple[np.ndarray, int]:
    """float32 ``[channels, samples]`` and Hz of an ``encode_excerpt`` file."""
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return np.ascontiguousarray(audio.T), int(rate)


def song_report(source: SourceAudio, analysis: SongAnalysis) -> dict:
    """What the job reports about its song (the plan's ``source_audio``; JSON)."""
    return {"origin": source.origin, "duration_seconds": round(source.duration_seconds, 3),
            "sample_rate": source.sample_rate, "bpm": round(float(analysis.bpm), 3),
            "key": {"key": analysis.key, "confidence": round(float(analysis.key_confidence), 3)},
            "first_downbeat_seconds": round(float(analysis.downbeats[0]), 6),
            "bars": int(len(analysis.downbeats))}


def analyse(source: SourceAudio, request: dict, settings) -> tuple[dict, bytes]:
    """Analyse a decoded song for a request: its source record and conditioning excerpt.

    Returns:
        (record, excerpt): ``{"report", "analysis" (SongAnalysis.to_dict), "region"
        (resolve_region), "grid", "excerpt": {"kind", "start_sample", "end_sample",
        "sample_rate"}}`` and the excerpt as FLAC (``encode_excerpt``).

    Raises:
        SourceAudioError: the song has nothing to analyse; SongRegionError: see resolve_region.
    """
    parameters = request["parameters"]
    try:
        analysis = analyse_song(source.audio, source.sample_rate)
    except ValueError as exc:
        raise SourceAudioError(f"source audio cannot be analysed: {exc}") from None
    region = resolve_region(analysis, parameters, settings)
    start, end = excerpt_span(region, parameters, source, settings)
    record = {"report": song_report(source, analysis), "analysis": analysis.to_dict(),
              "region": region, "grid": grid_for(parameters, region["bpm"]),
              "excerpt": {"kind": "continuation" if parameters.get("source_mode") == "continue"
                          else "region", "start_sample": start, "end_sample": end,
                          "sample_rate": source.sample_rate}}
    excerpt = encode_excerpt(source.audio[:, start:end], source.sample_rate, source.subtype)
    return record, excerpt


def result_region(record: dict) -> dict:
    """A stem's ``source_region`` (job and callback): where it belongs on the song's timeline."""
    region = record["region"]
    return {"start_bar": region["start_bar"], "bars": region["bars"],
            "start_seconds": region["start_seconds"], "end_seconds": region["end_seconds"],
            "first_downbeat_seconds": region["first_downbeat_seconds"], "bpm": region["bpm"],
            "grid": record["grid"]}
