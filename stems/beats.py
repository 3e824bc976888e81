"""Beat analysis of a stem: tempo, beat times refined on their attacks, bar phase.

1. a log-mel onset-strength envelope (spectral flux), the tempo from its autocorrelation with a
   target tempo as the octave prior (half/double tempo folded onto the octave of the target),
   beats by dynamic programming (Ellis 2007, "Beat tracking by dynamic programming", J. New Music
   Research 36(1), as implemented by ``librosa.beat.beat_track``), each beat refined to its attack
   on a 0.5 ms energy envelope and smoothed by robust local quadratic regression (separately on
   each side of a phase jump, as at a join of MusicGen's extension windows, where the next
   window's groove may start a little early or late);
2. the downbeat as the bar phase with the strongest evidence from kick-band onsets against
   snare-band onsets, bass-note changes and chord changes (beat-synchronous chroma novelty);
3. where harmony singles out a bar position (chords, arpeggios, bass lines; not drums alone), the
   beat grid and bar phase as ``stems.song`` chooses them for a song: of the tracked beats and the
   grid half a beat later (a tracker on syncopated material without drums may lock onto the
   off-beat 8ths), and of each one's 4 bar phases, the one whose bars chord templates fit best.

``stems.warping`` puts the beats found here on a grid. All public audio arrays are float
``[channels, samples]``; times are seconds, tempi BPM. Dependencies: numpy, librosa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import librosa
import numpy as np

__all__ = [
    "TempoError",
    "TempoAnalysisError",
    "Beats",
    "analyse_beats",
    "estimate_tempo",
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
# Phase jumps in the beat list (joins of MusicGen's extension windows): at least this big
# (seconds), at most this fraction of the period, confirmed by this many following beats.
_PHASE_JUMP_MIN = 0.008
_MAX_PHASE_JUMP = 0.2
_JUMP_CONFIRM = 5
_MIN_PIECE_BEATS = 6      # beats smoothed on each side of a jump, at least
# the harmonic beat/off-beat and bar-phase choice (``_harmonic_grid``): 4/4 bars, as
# ``stems.song`` analyses them, decided when the best bar position's chord-template fit is this
# much above the median position's (seed 0 of make bench-tempo: drums alone <= 0.010, tonal
# material >= 0.039)
_HARMONIC_BEATS_PER_BAR = 4
_HARMONIC_MIN_SPREAD = 0.025

class TempoError(ValueError):
    """Bad arguments: non-positive or non-finite BPM or sample rate, empty or non-finite audio,
    audio not shaped [channels, samples], bars or beats_per_bar < 1."""


class TempoAnalysisError(TempoError):
    """The material cannot be conformed, e.g. it is shorter than one beat at the target tempo,
    or (with ``bars=None``) shorter than one bar."""




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
class Beats:
    """What ``analyse_beats`` found in a clip."""

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
        return librosa.onset.onset_strength(S=log_mel[bands], sr=_ANALYSIS_SR, hop_length=_HOP, center=False)

    # center=False: the spectrogram above is already centred; librosa's ``center=True`` would
    # also shift the envelope by n_fft // (2 * hop) frames of its default n_fft (2048), i.e. put
    # every onset, and so every tracked beat, ~40 ms late
    env = librosa.onset.onset_strength(S=log_mel, sr=_ANALYSIS_SR, hop_length=_HOP, center=False)
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


def _attack_offset(coarse: np.ndarray, rise: np.ndarray) -> float:
    """The typical delay (s) from a coarse beat to its attack: the peak, within -60..+40 ms, of
    the 2 ms energy rise averaged over all beats and smoothed over 10 ms. One beat's rises also
    follow the waveform of low notes (a 50 Hz tone swells and dips every 10 ms), which averaging
    over beats at unrelated phases removes; the notes' own attacks remain."""
    fine_rate = _ANALYSIS_SR / _FINE_HOP
    lo, hi = int(round(-0.060 * fine_rate)), int(round(0.040 * fine_rate))
    rows = []
    for t in coarse:
        i = int(round(t * fine_rate))
        if i + lo >= 0 and i + hi < len(rise):
            rows.append(rise[i + lo: i + hi])
    if len(rows) < 4:
        return 0.0
    kernel = np.hanning(int(round(0.010 * fine_rate)) + 2)[1:-1]
    mean = np.convolve(np.mean(rows, axis=0), kernel / kernel.sum(), mode="same")
    # rise[j] is the rise of the 2 ms window that starts at frame j + 2 (see ``_fine_rise``)
    return ((lo + int(np.argmax(mean)) + 2) * _FINE_HOP + _FINE_WIN / 2) / _ANALYSIS_SR


def _refine_beats(coarse: np.ndarray, rise: np.ndarray) -> np.ndarray:
    """Move each coarse beat time (s) to its attack: first by the typical delay of all beats'
    attacks (``_attack_offset``), then to the strongest 2 ms energy rise within +-15 ms of that,
    traced back to where that rise first reaches half its height (as ``librosa.onset.
    onset_backtrack`` traces a peak back to its start). The window is narrow so that it holds one attack: a wider one reaches the swells of low notes
    or the release of the note before. The same placement serves a song's beat map and a stem's
    own beats (``stems.warping.conform_to_beats``), so both are measured alike."""
    fine_rate = _ANALYSIS_SR / _FINE_HOP
    offset = _attack_offset(coarse, rise)
    refined = np.array(coarse, dtype=float) + offset
    for i, t in enumerate(coarse + offset):
        a = max(0, int((t - 0.015) * fine_rate))
        b = min(len(rise), int((t + 0.015) * fine_rate) + 1)
        if b - a < 2:
            continue
        # the strongest rise, then back to where it first reaches half of its height
        j = a + int(np.argmax(rise[a:b]))
        half = 0.5 * rise[j]
        while j > a and rise[j - 1] >= half:
            j -= 1
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


def _harmonic_grid(y: np.ndarray, beats: np.ndarray, duration: float) -> tuple[np.ndarray, int] | None:
    """Beats and first-downbeat index chosen by harmony, or None where harmony does not decide.

    A tracker on tonal material without drums (syncopated bass lines held over the beat,
    arpeggios with ties) may lock onto the off-beat 8ths, and onsets alone rarely show beat 1
    there. Harmony changes on the bar line, so of the tracked beats and the grid half a beat
    later, and of each one's 4 bar phases, the one whose bars chord templates fit best wins:
    ``stems.song.harmonic_bar_grid``, the song analysis' own bar-phase choice (CQT chroma,
    Fujishima-style chord templates), applied only when its best bar position stands
    _HARMONIC_MIN_SPREAD above the median one (drums alone leave the choice to the onsets)."""
    from stems.song import harmonic_bar_grid  # stems.song builds on this module

    found = harmonic_bar_grid(y, beats, _HARMONIC_MIN_SPREAD)
    if found is None:
        return None
    grid, phase = found
    grid = grid[(grid >= 0.0) & (grid < duration)]
    return (grid, phase) if len(grid) >= 4 and phase < len(grid) else None


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


def analyse_beats(mono: np.ndarray, sample_rate: int, target_bpm: float, beats_per_bar: int) -> Beats | None:
    """Beat analysis of ``mono`` [samples] at ``sample_rate`` (Hz), the tempo read in the octave of
    ``target_bpm``; None when there is no pulse (shorter than 3 beats, silent, no periodicity)."""
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
    if beats_per_bar == _HARMONIC_BEATS_PER_BAR:
        harmonic = _harmonic_grid(y, smooth, duration)
        if harmonic is not None:
            smooth, phase = harmonic
    return Beats(times=smooth, source_bpm=float(source_bpm), confidence=confidence, downbeat_index=phase)


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
    beats = analyse_beats(y, _ANALYSIS_SR, rough, beats_per_bar)  # y: already at the analysis rate
    if beats is None:
        return rough, 0.0
    return float(beats.source_bpm), float(beats.confidence)
