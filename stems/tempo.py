"""Tempo analysis and beat-accurate, bar-aligned, loop-ready tempo conform.

MusicGen follows a "120 bpm" prompt only roughly and its tempo wanders within a clip, so one
constant stretch ratio leaves the beats drifting off any DAW grid. ``conform_to_bpm`` instead:

1. analyses the input: a log-mel onset-strength envelope (spectral flux), the tempo from its
   autocorrelation with the target tempo as the octave prior (half/double tempo folded onto the
   octave of the target), beats by dynamic programming (Ellis 2007, "Beat tracking by dynamic
   programming", J. New Music Research 36(1), as implemented by ``librosa.beat.beat_track``),
   each beat refined to its attack on a 0.5 ms energy envelope and smoothed by robust local
   quadratic regression (separately on each side of a phase jump, as at a join of MusicGen's
   extension windows, where the next window's groove may start a little early or late), and the
   downbeat as the bar phase with the strongest evidence from
   kick-band onsets against snare-band onsets, bass-note changes and chord changes
   (beat-synchronous chroma novelty);
2. warps so that every beat lands on the target grid: the beat -> grid map is piecewise linear,
   consecutive beats are merged into one segment while a single ratio keeps every beat inside it
   within 2 ms of its grid line, and each segment is stretched by Rubber Band (Cannam,
   breakfastquay.com/rubberband, via ``pedalboard.time_stretch``, offline mode, constant ratio)
   with margins, then joined by short crossfades just before the beat attacks;
3. starts on the first downbeat, trims to whole bars at the target tempo (exact to the sample),
   and with ``loop=True`` crossfades the material that follows the last bar line (which starts
   on a downbeat, like sample 0) into the start, so the end joins the start at matching phase.

Material without clear beats (pads, drones, noise) gets one constant ratio and a low confidence.

Rubber Band's own variable-ratio mode (``pedalboard.time_stretch`` with an array, one ratio per
INPUT sample, run in real-time mode) lags ratio changes by a second or more and does not keep the
output length, so it cannot put beats on a grid; per-segment offline stretching does.

All public audio arrays are float ``[channels, samples]``; times are seconds, tempi BPM.
Dependencies: numpy, librosa, pedalboard, soundfile.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import librosa
import numpy as np
import pedalboard
import soundfile as sf

__all__ = [
    "TempoError",
    "TempoAnalysisError",
    "TempoAnalysis",
    "ConformResult",
    "conform_to_bpm",
    "conform_file",
]

# Analysis runs on a mono copy at a fixed rate so that frame sizes mean the same for any input.
_ANALYSIS_SR = 22050
_HOP = 220              # ~10 ms onset-envelope frames
_N_FFT = 1024           # ~46 ms
_N_MELS = 64
_FINE_WIN = 44          # 2 ms energy window for attack refinement
_FINE_HOP = 11          # 0.5 ms
_CHROMA_N_FFT = 4096    # ~186 ms: semitone resolution down to the bass register
_CHROMA_HOP = 1024
_MAX_CHANNELS = 16

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
# Phase jumps in the beat list (joins of MusicGen's extension windows): at least this big
# (seconds), at most this fraction of the period, confirmed by this many following beats.
_PHASE_JUMP_MIN = 0.008
_MAX_PHASE_JUMP = 0.2
_JUMP_CONFIRM = 5
_MIN_PIECE_BEATS = 6      # beats smoothed on each side of a jump, at least


class TempoError(ValueError):
    """Bad arguments: non-positive or non-finite BPM or sample rate, empty or non-finite audio,
    audio not shaped [channels, samples], bars or beats_per_bar < 1."""


class TempoAnalysisError(TempoError):
    """The material cannot be conformed, e.g. it is shorter than one beat at the target tempo,
    or (with ``bars=None``) shorter than one bar."""


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
# input validation


def _validated_audio(audio: np.ndarray) -> np.ndarray:
    raw = np.asarray(audio)
    scale = 1.0
    if raw.dtype.kind in "iu":  # PCM integers: full scale -> 1.0
        scale = 1.0 / float(2 ** (8 * raw.dtype.itemsize - 1))
    try:
        arr = np.asarray(raw, dtype=np.float64) * scale
    except (TypeError, ValueError) as exc:
        raise TempoError(f"audio must be a numeric array: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2:
        raise TempoError(f"audio must be [channels, samples] or [samples], got shape {arr.shape}")
    if arr.shape[0] > _MAX_CHANNELS:
        raise TempoError(f"audio has {arr.shape[0]} channels; expected [channels, samples] "
                         f"(got shape {arr.shape} - transpose a [samples, channels] array)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise TempoError("audio is empty")
    if not np.all(np.isfinite(arr)):
        raise TempoError("audio contains NaN or infinite samples")
    return arr


def _validated_number(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TempoError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v) or v <= 0:
        raise TempoError(f"{name} must be a positive finite number, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------
# analysis


@dataclass(frozen=True)
class _Beats:
    times: np.ndarray          # smoothed beat times in the input, seconds (ascending)
    source_bpm: float
    confidence: float
    downbeat_index: int        # index into `times` of the first downbeat


@dataclass(frozen=True)
class _Features:
    env: np.ndarray       # onset strength, all bands, frames of _HOP
    env_kick: np.ndarray  # onset strength below 125 Hz (kick, bass attacks)
    env_mid: np.ndarray   # onset strength 150-2000 Hz (snare, claps, chords)
    bass: np.ndarray      # chroma 30-300 Hz, frames of _CHROMA_HOP
    chords: np.ndarray    # chroma 200-2000 Hz, frames of _CHROMA_HOP


def _onset_features(y: np.ndarray) -> _Features:
    """Onset envelopes (log-mel spectral flux) and bass/chord chroma of ``y`` at _ANALYSIS_SR."""
    power = np.abs(librosa.stft(y, n_fft=_N_FFT, hop_length=_HOP, center=True)) ** 2
    mel_fb = librosa.filters.mel(sr=_ANALYSIS_SR, n_fft=_N_FFT, n_mels=_N_MELS, fmin=30.0)
    log_mel = librosa.power_to_db(mel_fb @ power, ref=np.max, top_db=80.0)
    mel_hz = librosa.mel_frequencies(n_mels=_N_MELS + 2, fmin=30.0, fmax=_ANALYSIS_SR / 2)[1:-1]

    def flux(lo: float, hi: float) -> np.ndarray:
        bands = (mel_hz >= lo) & (mel_hz < hi)
        if not bands.any():
            bands[int(np.argmin(np.abs(mel_hz - lo)))] = True
        return librosa.onset.onset_strength(S=log_mel[bands], sr=_ANALYSIS_SR, hop_length=_HOP)

    env = librosa.onset.onset_strength(S=log_mel, sr=_ANALYSIS_SR, hop_length=_HOP)
    # bass notes need ~3 Hz resolution: a long window, on a coarse hop (averaged per beat anyway)
    long_power = np.abs(librosa.stft(y, n_fft=_CHROMA_N_FFT, hop_length=_CHROMA_HOP, center=True)) ** 2
    freqs = librosa.fft_frequencies(sr=_ANALYSIS_SR, n_fft=_CHROMA_N_FFT)
    chroma_fb = librosa.filters.chroma(sr=_ANALYSIS_SR, n_fft=_CHROMA_N_FFT, octwidth=None)
    bass = chroma_fb @ (long_power * ((freqs >= 30) & (freqs <= 300))[:, None])
    chords = chroma_fb @ (long_power * ((freqs >= 200) & (freqs <= 2000))[:, None])
    return _Features(env=env, env_kick=flux(0.0, 125.0), env_mid=flux(150.0, 2000.0), bass=bass, chords=chords)


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(x)))
    kernel = np.ones(width) / width
    pad = width // 2
    padded = np.pad(x, (pad, width - 1 - pad), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _tempo_from_autocorrelation(env: np.ndarray, target_bpm: float, beats_per_bar: int) -> tuple[float, float]:
    """Tempo (BPM) in the octave of ``target_bpm`` and its pulse clarity (0..1).

    The onset envelope minus its 1 s moving average (so slow swells of pads do not look
    periodic) is autocorrelated; each beat lag L in the octave around the target is scored by
    ac[L] + 0.5 (ac[2L] + ac[L/2]) + ac[beats_per_bar * L], i.e. supported by half-note,
    8th-note and bar periodicity, which makes half/double tempo collapse onto the octave the
    prompt asked for and rejects 3:4 look-alikes (e.g. 3+3+2 rhythms).
    """
    frame_rate = _ANALYSIS_SR / _HOP
    x = env - _moving_average(env, int(frame_rate))
    n = len(x)
    if n < 8 or not np.any(x):
        return target_bpm, 0.0
    ac = librosa.autocorrelate(x)
    if ac[0] <= 0:
        return target_bpm, 0.0
    ac = ac / ac[0] * n / np.maximum(1, n - np.arange(n))  # unbiased, normalised
    lo = frame_rate * 60.0 / (target_bpm * math.sqrt(2.0))
    hi = frame_rate * 60.0 / (target_bpm / math.sqrt(2.0))
    lags = np.arange(max(2, int(lo)), min(int(math.ceil(hi)) + 1, n // 2))
    if len(lags) < 3:
        return target_bpm, 0.0

    def at(lag: np.ndarray) -> np.ndarray:
        return np.interp(lag, np.arange(n), ac, right=0.0)

    score = at(lags) + 0.5 * (at(2.0 * lags) + at(lags / 2.0)) + at(beats_per_bar * lags)
    k = int(np.argmax(score))
    lag = float(lags[k])
    if 0 < k < len(lags) - 1:  # parabolic interpolation of the peak
        a, b, c = score[k - 1], score[k], score[k + 1]
        denom = a - 2 * b + c
        if denom < 0:
            lag += 0.5 * (a - c) / denom
    # pulse clarity: autocorrelation at the beat lag, allowing for a few % of tempo drift
    window = np.arange(int(lag * 0.97), int(math.ceil(lag * 1.03)) + 1)
    clarity = float(np.clip(np.max(at(window.astype(float))), 0.0, 1.0))
    return frame_rate * 60.0 / lag, clarity


def _fine_rise(y: np.ndarray) -> np.ndarray:
    """Log-energy rise over 2 ms on a 0.5 ms grid (attack detector for beat refinement)."""
    energy = np.concatenate(([0.0], np.cumsum(y.astype(np.float64) ** 2)))
    starts = np.arange(0, len(y) - _FINE_WIN, _FINE_HOP)
    if len(starts) < 8:
        return np.zeros(1)
    e = energy[starts + _FINE_WIN] - energy[starts]
    le = np.log10(e + 1e-6 * max(float(e.max()), 1e-20))
    step = 4  # 2 ms
    rise = np.zeros_like(le)
    rise[:-step] = le[step:] - le[:-step]
    return rise


def _refine_beats(coarse: np.ndarray, rise: np.ndarray) -> np.ndarray:
    """Move each coarse beat time (s) to its attack: the earliest rise within -40..+30 ms that
    reaches half of the strongest one there (a strum or a flam is heard at its first hit)."""
    fine_rate = _ANALYSIS_SR / _FINE_HOP
    refined = np.array(coarse, dtype=float)
    for i, t in enumerate(coarse):
        a = max(0, int((t - 0.040) * fine_rate))
        b = min(len(rise), int((t + 0.030) * fine_rate) + 1)
        if b - a < 2:
            continue
        w = rise[a:b]
        peak = float(w.max())
        j = a + (int(np.argmax(w >= 0.5 * peak)) if peak > 0 else int(np.argmax(w)))
        refined[i] = (j + 2) * _FINE_HOP / _ANALYSIS_SR + _FINE_WIN / (2 * _ANALYSIS_SR)
    return refined


def _regularise_beats(times: np.ndarray) -> np.ndarray:
    """Fill skipped beats and drop doubled ones (tracker slips), against the local period."""
    t = np.asarray(times, dtype=float)
    for _ in range(3):
        if len(t) < 3:
            return t
        d = np.diff(t)
        local = np.array([np.median(d[max(0, i - 4): i + 5]) for i in range(len(d))])
        changed = False
        out = [t[0]]
        for i, gap in enumerate(d):
            if gap > 1.6 * local[i]:
                k = int(round(gap / local[i]))
                out.extend(t[i] + gap * np.arange(1, k) / k)
                changed = True
            elif gap < 0.5 * local[i] and i + 1 < len(d):
                changed = True
                continue  # drop t[i+1]
            out.append(t[i + 1])
        t = np.array(out)
        if not changed:
            break
    return t


def _smooth_beats(times: np.ndarray, half_width: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Robust local quadratic regression of beat time against beat index (LOESS-style,
    tricube weights, two bisquare robustness passes). Returns (smoothed, residual)."""
    n = len(times)
    idx = np.arange(n, dtype=float)
    if n < 4:
        return times.copy(), np.zeros(n)
    robust = np.ones(n)
    smooth = times.copy()
    for _ in range(3):
        for k in range(n):
            lo, hi = max(0, k - half_width), min(n, k + half_width + 1)
            if hi - lo < 4:
                lo, hi = max(0, min(lo, n - 4)), min(n, max(hi, 4))
            x = idx[lo:hi] - k
            dist = np.abs(x) / (half_width + 1)
            w = (1 - dist ** 3) ** 3 * robust[lo:hi]
            if np.count_nonzero(w > 1e-6) < 3:
                w = np.ones_like(w)
            deg = 2 if hi - lo >= 5 else 1
            coef = np.polyfit(x, times[lo:hi], deg, w=np.sqrt(w))
            smooth[k] = coef[-1]
        resid = times - smooth
        scale = 6.0 * max(np.median(np.abs(resid)), 1e-4)
        robust = np.clip(1 - (resid / scale) ** 2, 0.0, 1.0) ** 2
    return smooth, times - smooth


def _phase_jumps(times: np.ndarray) -> list[int]:
    """Indices j where the beats from ``times[j]`` on are shifted in phase against those before
    (a join of MusicGen's extension windows: the new window's groove starts a little early or
    late). One interval off the local period while its neighbours are not, by more than
    _PHASE_JUMP_MIN seconds and 4 robust deviations of the intervals; a single misplaced beat
    instead makes two opposite deviations in a row and is left to the smoothing."""
    n = len(times)
    if n < 2 * _MIN_PIECE_BEATS:
        return []
    d = np.diff(times)
    local = np.array([np.median(np.delete(d[max(0, i - 4): i + 5], min(i, 4))) for i in range(len(d))])
    e = d - local
    spread = 1.4826 * float(np.median(np.abs(e)))
    jumps = []
    for i in range(1, len(d) - 1):
        size = abs(e[i])
        if size < max(_PHASE_JUMP_MIN, 4.0 * spread) or size > _MAX_PHASE_JUMP * local[i]:
            continue
        if abs(e[i - 1]) > 0.5 * size or abs(e[i + 1]) > 0.5 * size:
            continue
        j = i + 1
        if j >= _MIN_PIECE_BEATS and n - j >= _MIN_PIECE_BEATS and (not jumps or j - jumps[-1] >= _MIN_PIECE_BEATS):
            jumps.append(j)
    return jumps


def _smooth_pieces(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_smooth_beats`` on each run of beats between phase jumps (``_phase_jumps``), so that a
    jump stays a jump (the warp puts the beats on both sides on the grid) instead of being
    spread over the beats around it."""
    bounds = [0, *_phase_jumps(times), len(times)]
    parts = [_smooth_beats(times[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _beat_sync_novelty(beat_times: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of the mean chroma of each inter-beat span and the one before."""
    n = len(beat_times)
    frames = np.clip(np.round(beat_times * _ANALYSIS_SR / _CHROMA_HOP).astype(int), 0, chroma.shape[1] - 1)
    bounds = np.concatenate((frames, [chroma.shape[1]]))
    seg = np.stack([chroma[:, a:max(a + 1, b)].mean(axis=1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    seg = seg / np.maximum(np.linalg.norm(seg, axis=0, keepdims=True), 1e-12)
    novelty = np.zeros(n)
    novelty[1:] = 1.0 - np.sum(seg[:, 1:] * seg[:, :-1], axis=0)
    return novelty


def _downbeat_phase(beat_times: np.ndarray, feats: _Features, beats_per_bar: int) -> int:
    """Bar phase (0..beats_per_bar-1) of the downbeats.

    Evidence per phase, each as its relative contrast across the phases: kick-band onsets
    (below 125 Hz) minus half the snare/chord-band onsets (beat 1 carries the kick, the
    backbeat the snare), bass-note changes and chord changes (beat-synchronous chroma novelty;
    harmony tends to change on the bar line). Bass novelty counts fully only when it singles out
    one phase: in a drums-only clip the kick pattern alone makes the bass chroma wobble."""
    n = len(beat_times)
    if beats_per_bar == 1 or n < beats_per_bar:
        return 0
    f = np.clip(np.round(beat_times * _ANALYSIS_SR / _HOP).astype(int), 0, len(feats.env) - 1)

    def at_beats(env: np.ndarray) -> np.ndarray:
        return np.array([env[max(0, i - 2): i + 3].max() for i in f])

    def contrast(per_beat: np.ndarray) -> np.ndarray:
        v = np.array([per_beat[p::beats_per_bar].mean() for p in range(beats_per_bar)])
        m = v.mean()
        return (v - m) / m if m > 1e-9 else np.zeros(beats_per_bar)

    bass = contrast(_beat_sync_novelty(beat_times, feats.bass))
    ranked = np.sort(bass)
    bass_weight = 2.0 if ranked[-1] > 1.5 and ranked[-2] < 0.3 else 0.5
    score = (contrast(at_beats(feats.env_kick)) - 0.5 * contrast(at_beats(feats.env_mid))
             + bass_weight * bass + 0.5 * contrast(_beat_sync_novelty(beat_times, feats.chords)))
    return int(np.argmax(score))


def _consistent_beats(times: np.ndarray) -> np.ndarray:
    """Walk out from the middle of the beat list; a beat more than 8 % of the local period off
    the one predicted from its 4 predecessors is replaced when the next beat confirms the
    prediction (a one-off slip), kept when it starts a run of _JUMP_CONFIRM + 1 beats at the
    local period at most _MAX_PHASE_JUMP off in phase (a phase jump, as at a join of MusicGen's
    extension windows), and otherwise ends the list there (the tracker's guesses at the edges
    of the clip, where the music or the DP's evidence runs out)."""
    t = list(np.asarray(times, dtype=float))
    if len(t) < 8:
        return np.asarray(t)

    def new_phase(seq: list[float], k: int, pred: float, local: float) -> bool:
        """seq[k:] starts a run of beats at the local period (a line fit: slope within 6 %,
        every beat within 8 % of the period) whose phase is at most _MAX_PHASE_JUMP off."""
        if k + _JUMP_CONFIRM >= len(seq):
            return False
        run = np.asarray(seq[k: k + _JUMP_CONFIRM + 1])
        m = np.arange(len(run), dtype=float)
        slope, start = np.polyfit(m, run, 1)
        return bool(abs(slope - local) <= 0.06 * local
                    and np.max(np.abs(run - (start + slope * m))) <= 0.08 * local
                    and abs(start - pred) <= _MAX_PHASE_JUMP * local)

    def walk(seq: list[float], start: int) -> list[float]:
        out = seq[:start]
        k = start
        while k < len(seq):
            local = float(np.median(np.diff(out[-5:])))
            pred = out[-1] + local
            if abs(seq[k] - pred) <= 0.08 * local:
                out.append(seq[k])
            elif k + 1 < len(seq) and abs(seq[k + 1] - (out[-1] + 2 * local)) <= 0.08 * local:
                out.append(pred)
            elif new_phase(seq, k, pred, local):
                out.append(seq[k])
            else:
                break
            k += 1
        return out

    mid = len(t) // 2
    start = max(5, mid)
    forward = walk(t, start)
    backward = walk([-v for v in reversed(forward)], max(5, len(forward) - mid))
    return np.asarray([-v for v in reversed(backward)])


def _analyse(mono: np.ndarray, sample_rate: int, target_bpm: float, beats_per_bar: int) -> _Beats | None:
    """Beat analysis of ``mono`` [samples] at ``sample_rate``; None when there is no pulse."""
    duration = len(mono) / sample_rate
    if duration < 4 * 60.0 / target_bpm * 0.75 or np.max(np.abs(mono)) < 1e-6:
        return None
    y = mono.astype(np.float32)
    if sample_rate != _ANALYSIS_SR:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=_ANALYSIS_SR, res_type="soxr_mq")
    feats = _onset_features(y)
    env = feats.env
    tempo, clarity = _tempo_from_autocorrelation(env, target_bpm, beats_per_bar)
    if clarity <= 0.02 or not np.any(env):
        return None
    _, frames = librosa.beat.beat_track(onset_envelope=env, sr=_ANALYSIS_SR, hop_length=_HOP,
                                        bpm=tempo, tightness=100, trim=False)
    frames = np.asarray(frames, dtype=int)
    if len(frames) < 4:
        return None
    coarse = frames * _HOP / _ANALYSIS_SR
    rise = _fine_rise(y)
    refined = _refine_beats(coarse, rise)
    refined = _consistent_beats(_regularise_beats(np.sort(refined)))
    if len(refined) < 4:
        return None
    smooth, resid = _smooth_pieces(refined)
    inside = (smooth >= 0.0) & (smooth < duration)  # a smoothed edge beat may fall off the clip
    smooth, resid = smooth[inside], resid[inside]
    if len(smooth) < 4:
        return None
    period = float(np.median(np.diff(smooth)))
    if period <= 0:
        return None
    # confidence: a periodic onset envelope, beats on real attacks (average log-mel flux above
    # 2 dB: drums, plucks and strums reach 5-20 dB, pads, drones, tremolo and noise stay near 1),
    # and beats that follow a smooth tempo curve
    at_beats = np.array([env[max(0, i - 2): i + 3].max() for i in np.clip(frames, 0, len(env) - 1)])
    onset_share = float(np.mean(at_beats > 2.0))
    regularity = float(np.mean(np.abs(resid) < 0.04 * period))
    confidence = float(np.clip(min(1.0, clarity / 0.25) * onset_share * (0.5 + 0.5 * regularity), 0.0, 1.0))
    slope = np.polyfit(np.arange(len(smooth)), smooth, 1)[0]
    source_bpm = 60.0 / slope if slope > 0 else tempo
    phase = _downbeat_phase(smooth, feats, beats_per_bar)
    return _Beats(times=smooth, source_bpm=float(source_bpm), confidence=confidence, downbeat_index=phase)


def estimate_tempo(audio: np.ndarray, sample_rate: int, *, beats_per_bar: int = 4) -> tuple[float, float]:
    """Tempo of a recording with no target to fold onto (a user's song).

    librosa's tempo estimator (``librosa.feature.tempo``, an autocorrelation of the onset
    strength with a log-normal prior around 120 BPM) gives the octave; the beat analysis that
    conform uses (tracked beats, refined on attacks) then measures the tempo in that octave and
    how clear the pulse is.

    Args:
        audio: float ``[channels, samples]`` (or ``[samples]``). sample_rate: Hz.
        beats_per_bar: 4 for 4/4.

    Returns:
        ``(bpm, confidence)``: BPM, and 0..1 (0: no pulse found; bpm is then librosa's estimate).

    Raises:
        TempoError: audio that is not a finite numeric ``[channels, samples]`` array.
    """
    x = _validated_audio(audio)
    mono = x.mean(axis=0).astype(np.float32)
    y = mono if sample_rate == _ANALYSIS_SR else librosa.resample(
        mono, orig_sr=sample_rate, target_sr=_ANALYSIS_SR, res_type="soxr_mq")
    onset = librosa.onset.onset_strength(y=y, sr=_ANALYSIS_SR, hop_length=_HOP)
    rough = float(librosa.feature.tempo(onset_envelope=onset, sr=_ANALYSIS_SR, hop_length=_HOP)[0])
    if not math.isfinite(rough) or rough <= 0:
        return 120.0, 0.0
    beats = _analyse(y, _ANALYSIS_SR, rough, beats_per_bar)  # y: already at the analysis rate
    if beats is None:
        return rough, 0.0
    return float(beats.source_bpm), float(beats.confidence)


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
    sr_f = _validated_number("sample_rate", sample_rate)
    if sr_f != int(sr_f):
        raise TempoError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    sr = int(sr_f)
    if isinstance(beats_per_bar, bool) or not isinstance(beats_per_bar, (int, np.integer)) or beats_per_bar < 1:
        raise TempoError(f"beats_per_bar must be an integer >= 1, got {beats_per_bar!r}")
    beats_per_bar = int(beats_per_bar)
    if bars is not None and (isinstance(bars, bool) or not isinstance(bars, (int, np.integer)) or bars < 1):
        raise TempoError(f"bars must be None or an integer >= 1, got {bars!r}")
    x = _validated_audio(audio)
    # a DC offset, not the mean: the mean of sparse drums is not 0 and would lift the silences
    x = x - np.median(x, axis=1, keepdims=True)
    n_in = x.shape[1]
    duration = n_in / sr
    beat_out = 60.0 / target_bpm
    bar_out = beats_per_bar * beat_out
    if duration * 0.75 < beat_out * 0.999:
        # even stretched to the longest sensible ratio it would not fill one beat
        raise TempoAnalysisError(f"audio is {duration:.3f} s, shorter than one beat at {target_bpm:g} BPM")

    beats = _analyse(x.mean(axis=0), sr, target_bpm, beats_per_bar)
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
        anchor_out = np.arange(len(anchor_in)) * beat_out
        keep = _segments(anchor_in, anchor_out)
        anchor_in, anchor_out = anchor_in[keep], anchor_out[keep]
        source_bpm, confidence, method = beats.source_bpm, beats.confidence, "beat-warp"
        downbeat = float(anchor_in[0])
    else:
        confidence = beats.confidence if beats is not None else 0.0
        # Without a trusted grid, assume the model honoured the prompt unless a pulse was found.
        source_bpm = beats.source_bpm if beats is not None and confidence > 0.15 else target_bpm
        ratio = source_bpm / target_bpm
        bars_avail = int(math.floor(duration * ratio / bar_out + 1e-9))
        if bars is None and bars_avail < 1:
            raise TempoAnalysisError(f"audio is {duration:.3f} s, shorter than one bar at {target_bpm:g} BPM")
        n_bars = bars if bars is not None else bars_avail
        used_bars = min(n_bars, bars_avail)
        end_in = used_bars * bar_out / ratio if used_bars >= 1 else duration
        anchor_in = np.array([0.0, end_in])
        anchor_out = anchor_in * ratio
        method = "constant-ratio"
        downbeat = 0.0

    n_out = int(round(n_bars * bar_out * sr))
    loop_len = int(round(min(_LOOP_XFADE_MAX, beat_out / 4) * sr)) if loop else 0
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
        target_bpm=target_bpm,
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
