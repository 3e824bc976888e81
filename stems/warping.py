"""Beat-accurate, bar-aligned, loop-ready tempo conform with Rubber Band.

MusicGen follows a "120 bpm" prompt only roughly and its tempo wanders within a clip, so one
constant stretch ratio leaves the beats drifting off any DAW grid. ``conform_to_bpm`` instead:

1. tracks the beats and the downbeat (``stems.beats.analyse_beats``);
2. warps so that every beat lands on the target grid: the beat -> grid map is piecewise linear,
   consecutive beats are merged into one segment while a single ratio keeps every beat inside it
   within 2 ms of its grid line, and each segment is stretched by Rubber Band (Cannam,
   breakfastquay.com/rubberband, via ``pedalboard.time_stretch``, offline mode, constant ratio)
   with margins, then joined by short crossfades just before the beat attacks;
3. starts on the first downbeat, trims to whole bars at the target tempo (exact to the sample),
   and with ``loop=True`` crossfades the material that follows the last bar line (which starts
   on a downbeat, like sample 0) into the start, so the end joins the start at matching phase.

``conform_to_beats`` does the same onto a given beat map (a played song's beats, which drift)
instead of a constant grid.

Material without clear beats (pads, drones, noise) gets one constant ratio and a low confidence.

Rubber Band's own variable-ratio mode (``pedalboard.time_stretch`` with an array, one ratio per
INPUT sample, run in real-time mode) lags ratio changes by a second or more and does not keep the
output length, so it cannot put beats on a grid; per-segment offline stretching does.

All public audio arrays are float ``[channels, samples]``; times are seconds, tempi BPM.
Dependencies: numpy, pedalboard, soundfile.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pedalboard
import soundfile as sf

from stems.beats import TempoAnalysisError, TempoError, _validated_audio, _validated_number, analyse_beats

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "TempoAnalysis",
    "ConformResult",
    "conform_to_bpm",
    "conform_to_beats",
    "conform_file",
]

# Below this the beat grid is not trusted and one constant ratio is used.
CONFIDENCE_THRESHOLD = 0.35
# Segmenting the beat -> grid map: every beat within this of its grid line (seconds, output).
_SEGMENT_TOLERANCE = 0.002
# Rubber Band drifts a few ms over long offline renders; bound each render.
_MAX_SEGMENT_SECONDS = 2.0
_XFADE_SECONDS = 0.006   # join between segment renders
_XFADE_LEAD = 0.002      # join ends this long before the beat's attack
_MARGIN_SECONDS = 0.05   # extra input rendered on both sides of a segment
_LOOP_XFADE_MAX = 0.05   # loop join crossfade, at most a quarter beat


@dataclass(frozen=True)
class TempoAnalysis:
    """What ``conform_to_bpm`` found and did. Times in seconds, tempi in BPM."""

    target_bpm: float
    source_bpm: float            # estimated tempo of the input, BPM
    confidence: float            # 0..1
    method: str                  # "beat-warp" or "constant-ratio"
    stretch_ratio_min: float     # output/input duration ratio range applied
    stretch_ratio_max: float
    beats_per_bar: int
    bars: int                    # whole bars in the output
    downbeat_offset_seconds: float  # where in the INPUT the first kept downbeat was
    padded_seconds: float        # silence appended to reach `bars` (0 normally)
    duration_seconds: float      # output length == bars * beats_per_bar * 60 / target_bpm
    # "constant-bpm" (conform_to_bpm) or "song-beats" (conform_to_beats: target_bpm is then the
    # mean tempo of the target beat map)
    grid: str = "constant-bpm"

    def to_dict(self) -> dict:
        """JSON-serialisable dict of the fields (plain Python floats/ints/strs)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (float, np.floating)):
                value = float(value)
                if not math.isfinite(value):
                    value = None
            elif isinstance(value, (int, np.integer)):
                value = int(value)
            out[field.name] = value
        return out


@dataclass(frozen=True)
class ConformResult:
    audio: np.ndarray            # float32 [channels, samples]
    sample_rate: int             # Hz, same as input
    analysis: TempoAnalysis



# --------------------------------------------------------------------------------------------
# warping


def _segments(anchor_in: np.ndarray, anchor_out: np.ndarray) -> list[int]:
    """Indices of the anchors that start/end constant-ratio segments (first and last included):
    a segment grows while one ratio keeps every inner anchor within _SEGMENT_TOLERANCE of its
    grid line and the segment is shorter than _MAX_SEGMENT_SECONDS."""
    keep = [0]
    a = 0
    n = len(anchor_in)
    while a < n - 1:
        b = a + 1
        while b + 1 < n and anchor_in[b + 1] - anchor_in[a] <= _MAX_SEGMENT_SECONDS:
            c = b + 1
            ratio = (anchor_out[c] - anchor_out[a]) / (anchor_in[c] - anchor_in[a])
            mapped = anchor_out[a] + (anchor_in[a + 1:c] - anchor_in[a]) * ratio
            if np.max(np.abs(mapped - anchor_out[a + 1:c])) > _SEGMENT_TOLERANCE:
                break
            b = c
        keep.append(b)
        a = b
    return keep


def _stretch(x: np.ndarray, sample_rate: int, ratio: float) -> np.ndarray:
    """Rubber Band offline stretch of x [channels, samples] to ~ratio times its duration."""
    if x.shape[1] == 0:
        return np.zeros((x.shape[0], 0), dtype=np.float32)
    if abs(ratio - 1.0) < 1e-9:
        return x.astype(np.float32, copy=True)
    return pedalboard.time_stretch(np.ascontiguousarray(x, dtype=np.float32), float(sample_rate),
                                   stretch_factor=1.0 / ratio)


def _render(x: np.ndarray, sample_rate: int, anchor_in: np.ndarray, anchor_out: np.ndarray,
            head: float, tail: float) -> tuple[np.ndarray, int, np.ndarray]:
    """Piecewise-linear time map through (anchor_in -> anchor_out) (seconds), rendered by
    constant-ratio Rubber Band per segment and crossfaded just before each inner anchor.

    Renders output time [anchor_out[0] - head, anchor_out[-1] + tail]; material before the
    first / after the last anchor follows the first / last segment's ratio and stops where the
    input does. Returns (audio [channels, samples], index of anchor_out[0] in it, ratios)."""
    channels, n_in = x.shape
    xf = int(round(_XFADE_SECONDS * sample_rate))
    lead = int(round(_XFADE_LEAD * sample_rate))
    margin = _MARGIN_SECONDS
    ratios = np.diff(anchor_out) / np.diff(anchor_in)
    start_out = anchor_out[0] - head
    total = int(math.ceil((anchor_out[-1] + tail - start_out) * sample_rate))
    acc = np.zeros((channels, total), dtype=np.float64)
    wsum = np.zeros(total, dtype=np.float64)
    n_seg = len(ratios)
    # output sample (relative to start_out) of each inner join's end
    joins = [int(round((anchor_out[j] - start_out) * sample_rate)) - lead for j in range(1, n_seg)]
    for j, r in enumerate(ratios):
        first, last = j == 0, j == n_seg - 1
        pre = head / r + margin if first else (xf + lead) / sample_rate / r + margin
        post = tail / r + margin if last else margin
        s = max(0, int(math.floor((anchor_in[j] - pre) * sample_rate)))
        e = min(n_in, int(math.ceil((anchor_in[j + 1] + post) * sample_rate)))
        if e <= s:
            continue
        y = _stretch(x[:, s:e], sample_rate, r)
        # output index (relative to start_out) of y[0]
        offset = int(round((anchor_out[j] - start_out) * sample_rate + (s - anchor_in[j] * sample_rate) * r))
        lo = 0 if first else joins[j - 1] - xf
        hi = total if last else joins[j]
        w = np.ones(hi - lo)
        if not first:
            w[:xf] = np.linspace(0.0, 1.0, xf, endpoint=False) + 0.5 / xf
        if not last:
            w[-xf:] = np.linspace(1.0, 0.0, xf, endpoint=False) - 0.5 / xf
        # clip to what the render covers
        a = max(lo, offset)
        b = min(hi, offset + y.shape[1])
        if b <= a:
            continue
        ww = w[a - lo: b - lo]
        acc[:, a:b] += y[:, a - offset: b - offset] * ww
        wsum[a:b] += ww
    # where only one render contributes at a fade (input edges), renormalise
    covered = wsum > 1e-6
    acc[:, covered] /= wsum[covered]
    head_samples = int(round(head * sample_rate))
    return acc.astype(np.float32), head_samples, ratios


def _loop_join(body: np.ndarray, before: np.ndarray, after: np.ndarray, length: int) -> np.ndarray:
    """Make body's end continue into its start. ``after`` is the audio that follows the last bar
    line (begins on a downbeat, like body[0]); ``before`` the audio that precedes body[0]."""
    out = body.copy()
    n = out.shape[1]
    length = min(length, n // 2)
    if length < 2:
        return out
    fade = (0.5 - 0.5 * np.cos(np.pi * (np.arange(length) + 0.5) / length)).astype(np.float32)
    if after.shape[1] >= length:
        # sample 0 becomes the natural continuation of the last sample
        out[:, :length] = after[:, :length] * (1 - fade) + out[:, :length] * fade
    elif before.shape[1] >= length:
        # the last sample leads into sample 0 as the audio before the downbeat did
        out[:, n - length:] = out[:, n - length:] * (1 - fade) + before[:, -length:] * fade
    else:
        short = min(length, max(2, n // 100))
        ramp = np.linspace(0.0, 1.0, short, dtype=np.float32)
        out[:, :short] *= ramp
        out[:, n - short:] *= ramp[::-1]
    return out


def conform_to_bpm(audio: np.ndarray, sample_rate: int, target_bpm: float, *, bars: int | None = None,
                   loop: bool = False, beats_per_bar: int = 4) -> ConformResult:
    """Warp ``audio`` so that its beats land on a grid at ``target_bpm``, bar-aligned.

    Args:
        audio: float ``[channels, samples]`` (1-D ``[samples]`` is taken as mono), any level;
            integer PCM arrays are scaled to +-1; DC offset is removed.
        sample_rate: Hz, any positive rate; the output has the same rate.
        target_bpm: the grid tempo, BPM (> 0).
        bars: output length in bars; None takes as many whole bars as the material gives (at
            least 1). If the material is shorter than ``bars``, the tail is padded with silence
            (reported in ``padded_seconds``).
        loop: crossfade the end into the start so the output loops seamlessly.
        beats_per_bar: beats per bar (4 for 4/4).

    Returns:
        ConformResult with float32 ``[channels, samples]`` audio of exactly
        ``round(bars * beats_per_bar * 60 / target_bpm * sample_rate)`` samples whose first
        sample is the first downbeat, and the TempoAnalysis.

    Raises:
        TempoError: bad arguments (see the class).
        TempoAnalysisError: shorter than one beat at the target tempo, or shorter than one
            bar with ``bars=None``.

    The source tempo is read in the octave of the target (a 60 BPM groove asked to be 115 BPM
    is read as 120 BPM): the prompt asked for the target, so half/double readings fold onto
    it. Below CONFIDENCE_THRESHOLD the whole clip gets one ratio, from the estimated tempo
    when some pulse was found (confidence > 0.15) and otherwise 1.0 (the model is assumed to
    have honoured the prompt); it then starts at the first sample.
    """
    target_bpm = _validated_number("target_bpm", target_bpm)
    sr, beats_per_bar = _validated_common(sample_rate, beats_per_bar, bars)
    x = _validated_audio(audio)
    return _conform(x, sr, _ConstantGrid(60.0 / target_bpm), bars=bars, loop=loop,
                    beats_per_bar=beats_per_bar)


def conform_to_beats(audio: np.ndarray, sample_rate: int, target_beats, *, bars: int | None = None,
                     loop: bool = False, beats_per_bar: int = 4) -> ConformResult:
    """Warp ``audio`` so that its beats land on ``target_beats``: a played song's beat map.

    The stem's own beats are tracked (``stems.beats.analyse_beats``, tempo read in the octave of
    the target map's mean tempo) and warped with Rubber Band so that the stem's first downbeat
    lands at 0.0 and its k-th beat after it at ``target_beats[k]``, every beat, so a stem laid on
    the song's timeline at the region's first downbeat follows the song's drift. Material without
    a trusted beat (confidence below CONFIDENCE_THRESHOLD) is taken to be at the map's mean tempo
    (the model was prompted with it) and its nominal beats are warped onto the map the same way.

    Args:
        audio: float ``[channels, samples]`` (or ``[samples]``), as ``conform_to_bpm``.
        sample_rate: Hz.
        target_beats: ascending beat times, seconds from the stem's start, ``target_beats[0] ==
            0.0`` (the region's first downbeat); at least 2. ``SongRegion.beats`` minus its
            ``start_seconds`` is such a map. Beyond its end the map continues at its last period.
        bars: output length in bars; None takes ``(len(target_beats) - 1) // beats_per_bar``
            (at least 1).
        loop, beats_per_bar: as ``conform_to_bpm``.

    Returns:
        ConformResult whose audio is ``round(target_beats[bars * beats_per_bar] * sample_rate)``
        samples long (the map extrapolated where it is shorter); its TempoAnalysis has
        ``grid == "song-beats"`` and ``target_bpm`` the map's mean tempo over those bars.

    Raises:
        TempoError: bad arguments; ``target_beats`` not finite, not strictly ascending, fewer than
            2 or not starting at 0.0.
        TempoAnalysisError: audio shorter than one beat of the map.
    """
    sr, beats_per_bar = _validated_common(sample_rate, beats_per_bar, bars)
    try:
        grid_times = np.asarray(target_beats, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TempoError(f"target_beats must be a sequence of seconds: {exc}") from exc
    if len(grid_times) < 2 or not np.all(np.isfinite(grid_times)) or np.any(np.diff(grid_times) <= 0) \
            or abs(grid_times[0]) > 1e-6:
        raise TempoError("target_beats must be at least 2 finite, strictly ascending times starting at 0.0")
    x = _validated_audio(audio)
    if bars is None:
        bars = max(1, (len(grid_times) - 1) // beats_per_bar)
    return _conform(x, sr, _BeatMapGrid(grid_times - grid_times[0]), bars=bars, loop=loop,
                    beats_per_bar=beats_per_bar)


def _validated_common(sample_rate, beats_per_bar, bars) -> tuple[int, int]:
    sr_f = _validated_number("sample_rate", sample_rate)
    if sr_f != int(sr_f):
        raise TempoError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    if isinstance(beats_per_bar, bool) or not isinstance(beats_per_bar, (int, np.integer)) or beats_per_bar < 1:
        raise TempoError(f"beats_per_bar must be an integer >= 1, got {beats_per_bar!r}")
    if bars is not None and (isinstance(bars, bool) or not isinstance(bars, (int, np.integer)) or bars < 1):
        raise TempoError(f"bars must be None or an integer >= 1, got {bars!r}")
    return int(sr_f), int(beats_per_bar)


class _ConstantGrid:
    """Output time of beat k on a constant grid."""

    name = "constant-bpm"

    def __init__(self, beat_seconds: float):
        self.beat = beat_seconds

    def at(self, k) -> np.ndarray:
        return np.asarray(k, dtype=np.float64) * self.beat

    def mean_beat(self, n: int) -> float:
        return self.beat

    uniform = True


class _BeatMapGrid:
    """Output time of beat k on a beat map (seconds, [0] == 0), continued at its last period."""

    name = "song-beats"
    uniform = False

    def __init__(self, times: np.ndarray):
        self.times = times
        self.last_period = float(times[-1] - times[-2])

    def at(self, k) -> np.ndarray:
        k = np.asarray(k, dtype=np.float64)
        n = len(self.times)
        inside = np.interp(k, np.arange(n), self.times)
        return np.where(k > n - 1, self.times[-1] + (k - (n - 1)) * self.last_period, inside)

    def mean_beat(self, n: int) -> float:
        return float(self.at(n)) / n


def _conform(x: np.ndarray, sr: int, grid, *, bars: int | None, loop: bool, beats_per_bar: int) -> ConformResult:
    """conform_to_bpm / conform_to_beats on validated arguments; ``grid.at(k)`` is the output
    time (s) of beat k after the first downbeat."""
    # a DC offset, not the mean: the mean of sparse drums is not 0 and would lift the silences
    x = x - np.median(x, axis=1, keepdims=True)
    n_in = x.shape[1]
    duration = n_in / sr
    beat_out = grid.mean_beat(bars * beats_per_bar if bars is not None else beats_per_bar)
    target_bpm = 60.0 / beat_out
    if duration * 0.75 < beat_out * 0.999:
        # even stretched to the longest sensible ratio it would not fill one beat
        raise TempoAnalysisError(f"audio is {duration:.3f} s, shorter than one beat at {target_bpm:g} BPM")

    beats = analyse_beats(x.mean(axis=0), sr, target_bpm, beats_per_bar)
    use_warp = beats is not None and beats.confidence >= CONFIDENCE_THRESHOLD

    if use_warp:
        times = beats.times
        first = beats.downbeat_index
        period_end = float(np.median(np.diff(times[-min(len(times), 9):])))
        # extend the beat list past the last detected beat while the input still covers it
        extra = []
        t = times[-1] + period_end
        while t <= duration + 1e-9:
            extra.append(t)
            t += period_end
        all_times = np.concatenate((times, extra))
        available_beats = len(all_times) - 1 - first
        bars_avail = max(0, available_beats // beats_per_bar)
        if bars is None and bars_avail < 1:
            raise TempoAnalysisError(f"audio holds no whole bar of {beats_per_bar} beats after its first downbeat")
        n_bars = bars if bars is not None else bars_avail
        used_bars = min(n_bars, bars_avail)
        if used_bars >= 1:
            anchor_in = all_times[first: first + used_bars * beats_per_bar + 1]
        else:
            # less than a bar: warp the beats there are, the rest is padding
            anchor_in = all_times[first:]
            if len(anchor_in) < 2:
                anchor_in = np.array([all_times[first], min(duration, all_times[first] + period_end)])
        anchor_out = grid.at(np.arange(len(anchor_in)))
        keep = _segments(anchor_in, anchor_out)
        anchor_in, anchor_out = anchor_in[keep], anchor_out[keep]
        source_bpm, confidence, method = beats.source_bpm, beats.confidence, "beat-warp"
        downbeat = float(anchor_in[0])
    else:
        confidence = beats.confidence if beats is not None else 0.0
        # Without a trusted grid, assume the model honoured the prompt unless a pulse was found.
        source_bpm = beats.source_bpm if beats is not None and confidence > 0.15 else target_bpm
        beat_in = 60.0 / source_bpm
        bars_avail = int(math.floor(duration / (beats_per_bar * beat_in) + 1e-9))
        if bars is None and bars_avail < 1:
            raise TempoAnalysisError(f"audio is {duration:.3f} s, shorter than one bar at {target_bpm:g} BPM")
        n_bars = bars if bars is not None else bars_avail
        used_bars = min(n_bars, bars_avail)
        if grid.uniform:
            ratio = source_bpm / target_bpm
            end_in = used_bars * beats_per_bar * beat_in if used_bars >= 1 else duration
            anchor_in = np.array([0.0, end_in])
            anchor_out = anchor_in * ratio
        else:
            # the material's nominal beats, one every beat_in, onto the map
            n_beats = used_bars * beats_per_bar if used_bars >= 1 else max(1, int(duration / beat_in))
            anchor_in = np.arange(n_beats + 1) * beat_in
            if anchor_in[-1] > duration:
                anchor_in[-1] = duration
            anchor_out = grid.at(np.arange(n_beats + 1))
            keep = _segments(anchor_in, anchor_out)
            anchor_in, anchor_out = anchor_in[keep], anchor_out[keep]
        method = "constant-ratio" if grid.uniform else "nominal-beat-warp"
        downbeat = 0.0

    n_out = int(round(float(grid.at(n_bars * beats_per_bar)) * sr))
    bar_out_first = float(grid.at(beats_per_bar))
    loop_len = int(round(min(_LOOP_XFADE_MAX, bar_out_first / beats_per_bar / 4) * sr)) if loop else 0

    # render everything the input still has after the last anchor when padding is needed
    content_end_out = anchor_out[-1]
    tail = loop_len / sr + 0.01
    if used_bars < n_bars:
        last_ratio = (anchor_out[-1] - anchor_out[-2]) / (anchor_in[-1] - anchor_in[-2])
        tail = max(tail, (duration - anchor_in[-1]) * last_ratio)
    head = min(anchor_in[0], loop_len / sr + 0.01) * ((anchor_out[1] - anchor_out[0]) / (anchor_in[1] - anchor_in[0]))
    rendered, zero, ratios = _render(x, sr, anchor_in, anchor_out, head, tail)
    # how much of the output the input actually fills
    last_ratio = ratios[-1]
    content = int(math.floor(((duration - anchor_in[-1]) * last_ratio + content_end_out) * sr))
    content = max(0, min(content, rendered.shape[1] - zero))
    body = np.zeros((x.shape[0], n_out), dtype=np.float32)
    take = min(n_out, content)
    body[:, :take] = rendered[:, zero: zero + take]
    # a shortfall under 1 ms is rounding at the input's last sample, not padding
    padded = (n_out - take) / sr if n_out - take > 0.001 * sr else 0.0
    if padded and take > 0:
        fade = min(take, int(0.005 * sr))
        body[:, take - fade: take] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    if loop:
        before = rendered[:, :zero]
        after = rendered[:, zero + n_out: zero + content]  # empty when the input ends at the last bar
        body = _loop_join(body, before, after, loop_len)

    analysis = TempoAnalysis(
        target_bpm=float(60.0 / grid.beat if grid.uniform
                         else 60.0 * n_bars * beats_per_bar / float(grid.at(n_bars * beats_per_bar))),
        source_bpm=float(source_bpm),
        confidence=float(round(confidence, 4)),
        method=method,
        stretch_ratio_min=float(np.min(ratios)),
        stretch_ratio_max=float(np.max(ratios)),
        beats_per_bar=beats_per_bar,
        bars=int(n_bars),
        downbeat_offset_seconds=downbeat,
        padded_seconds=float(padded),
        duration_seconds=n_out / sr,
        grid=grid.name,
    )
    return ConformResult(audio=np.ascontiguousarray(body, dtype=np.float32), sample_rate=sr, analysis=analysis)


def conform_file(in_path, out_path, target_bpm: float, *, bars: int | None = None, loop: bool = False) -> dict:
    """Conform a soundfile-readable file (``in_path``) and write ``out_path`` as a 24-bit PCM WAV
    at the same sample rate and channel count (samples beyond full scale clip in the 24-bit
    encoding: normalise loudness before writing when that matters).

    Returns ``analysis.to_dict()``. Raises TempoError / TempoAnalysisError as
    ``conform_to_bpm``; soundfile's errors for unreadable files."""
    data, sr = sf.read(in_path, dtype="float32", always_2d=True)
    result = conform_to_bpm(data.T, sr, target_bpm, bars=bars, loop=loop)
    sf.write(out_path, result.audio.T, result.sample_rate, subtype="PCM_24", format="WAV")
    return result.analysis.to_dict()
