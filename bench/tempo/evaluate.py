"""Independent judge of a conformed clip: aubio onsets + an 8th-note grid fit.

The onset detectors here are aubio's (Brossier 2006), deliberately not the librosa onset envelope
that ``stems.beats`` analyses, so the bench does not grade the conform with its own yardstick:

- ``complex``: the complex-domain detection function (Duxbury et al. 2003), the most precise on
  percussive material (drum grooves), but on sustained tonal material it also fires between notes
  (Karplus-Strong partials, late low-bass attacks);
- ``specdiff``: spectral difference (Foote & Uchihashi 2001, as aubio's specdesc.h cites), a few
  ms later and a few ms less precise on drums, and sound on tonal material.

``DETECTORS`` holds each one's threshold. Which one judges which set is the bench runner's choice,
by each detector's self-check on the unprocessed clips (``truth_p75_ms``).

Metrics for one output clip at target tempo T:
- tempo error (%): an 8th-note grid (period p, phase) is fitted to the onsets (circular
  resultant search, then least-squares on grid indices); tempo = 30 / p; error = |tempo - T| / T;
- grid distance p75 (ms): with the period fixed at exactly 30 / T and the best phase, the 75th
  percentile of |onset - nearest grid line|;
- join grid distance p75 (ms, window-join clips): the same, over the onsets within 2 s of each
  window join in the output, against the grid phase that fits the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import aubio
import numpy as np

HOP = 128
WIN = 1024
#: aubio onset methods the judge may use, and each one's peak-picking threshold
DETECTORS = {"complex": 0.3, "specdiff": 0.5}


def detect_onsets(audio: np.ndarray, sample_rate: int, detector: str = "complex") -> np.ndarray:
    """Onset times in seconds of ``audio`` [channels, samples] (mixed to mono), via aubio's
    ``detector`` (a key of ``DETECTORS``; KeyError for another)."""
    threshold = DETECTORS[detector]
    mono = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1, audio.shape[-1]).mean(axis=0))
    hop = HOP
    det = aubio.onset(detector, WIN, hop, sample_rate)
    det.set_threshold(threshold)
    det.set_minioi_ms(40.0)
    det.set_silence(-60.0)
    pad = (-len(mono)) % hop
    mono = np.concatenate([mono, np.zeros(pad + hop, dtype=np.float32)])
    onsets = []
    for start in range(0, len(mono) - hop + 1, hop):
        if det(mono[start:start + hop])[0] > 0:
            onsets.append(det.get_last_s())
    return np.asarray(onsets, dtype=float)


def _resultant(t: np.ndarray, period: float) -> float:
    return float(np.abs(np.mean(np.exp(2j * np.pi * t / period))))


def fit_grid(onsets: np.ndarray, nominal_period: float, search: float = 0.15) -> tuple[float, float]:
    """Fit an isochronous grid t = phase + n * period to ``onsets`` (seconds).

    The period is searched within +-``search`` of ``nominal_period``: coarse-to-fine on the
    circular resultant length, then refined by least squares on each onset's grid index with
    outliers (more than a quarter period off) dropped. Returns (period, phase) in seconds.
    """
    if len(onsets) < 4:
        return float("nan"), float("nan")
    lo, hi = nominal_period * (1 - search), nominal_period * (1 + search)
    periods = np.linspace(lo, hi, 1501)
    scores = [_resultant(onsets, p) for p in periods]
    best = periods[int(np.argmax(scores))]
    step = periods[1] - periods[0]
    fine = np.linspace(best - step, best + step, 201)
    best = fine[int(np.argmax([_resultant(onsets, p) for p in fine]))]
    phase = float(np.angle(np.mean(np.exp(2j * np.pi * onsets / best))) / (2 * np.pi) * best)
    period = best
    for _ in range(4):
        idx = np.round((onsets - phase) / period)
        res = onsets - (phase + idx * period)
        inl = np.abs(res) < period / 4
        if inl.sum() < 4:
            break
        a = np.vstack([np.ones(inl.sum()), idx[inl]]).T
        phase, period = np.linalg.lstsq(a, onsets[inl], rcond=None)[0]
    return float(period), float(phase)


def grid_distance_p75(onsets: np.ndarray, period: float) -> float:
    """75th-percentile distance (seconds) of ``onsets`` from a grid of ``period`` at the best phase."""
    return best_grid_phase(onsets, period)[1]


def best_grid_phase(onsets: np.ndarray, period: float) -> tuple[float, float]:
    """(phase, p75 distance), seconds: the phase of a grid of ``period`` that minimises the
    75th-percentile distance of ``onsets`` from it, and that distance."""
    if len(onsets) == 0:
        return float("nan"), float("nan")
    phases = np.linspace(0.0, period, 400, endpoint=False)
    best, best_phase = np.inf, 0.0
    for ph in phases:
        d = np.abs((onsets - ph + period / 2) % period - period / 2)
        p75 = float(np.percentile(d, 75))
        if p75 < best:
            best, best_phase = p75, float(ph)
    return best_phase, best


def grid_distance_near(onsets: np.ndarray, period: float, centres, half_width: float = 2.0) -> list[float]:
    """For each time in ``centres`` (seconds), the 75th-percentile distance (seconds) of the onsets
    within ``half_width`` of it from the grid of ``period`` at the phase that fits the WHOLE clip
    (``best_grid_phase``), so a phase jump that the output kept shows up (a local phase fit
    would absorb it). NaN where fewer than 4 onsets fall in the span."""
    phase, _ = best_grid_phase(onsets, period)
    out = []
    for c in centres:
        near = onsets[np.abs(onsets - c) <= half_width]
        if len(near) < 4:
            out.append(float("nan"))
            continue
        d = np.abs((near - phase + period / 2) % period - period / 2)
        out.append(float(np.percentile(d, 75)))
    return out


@dataclass(frozen=True)
class Score:
    tempo_bpm: float
    tempo_error_percent: float
    grid_p75_ms: float
    n_onsets: int


def score(audio: np.ndarray, sample_rate: int, target_bpm: float, detector: str = "complex") -> Score:
    """Judge ``audio`` [channels, samples] against an 8th-note grid at ``target_bpm``, with
    aubio's ``detector`` onsets."""
    onsets = detect_onsets(audio, sample_rate, detector)
    eighth = 30.0 / target_bpm
    period, _ = fit_grid(onsets, eighth)
    tempo = 30.0 / period if np.isfinite(period) else float("nan")
    err = abs(tempo - target_bpm) / target_bpm * 100 if np.isfinite(tempo) else float("inf")
    return Score(tempo_bpm=tempo, tempo_error_percent=err,
                 grid_p75_ms=grid_distance_p75(onsets, eighth) * 1000, n_onsets=len(onsets))


def truth_distance_ms(onsets: np.ndarray, truth: np.ndarray) -> float:
    """Median |onset - nearest true time| in ms (detector self-check on unprocessed clips)."""
    if len(onsets) == 0 or len(truth) == 0:
        return float("nan")
    idx = np.clip(np.searchsorted(truth, onsets), 1, len(truth) - 1)
    d = np.minimum(np.abs(onsets - truth[idx - 1]), np.abs(onsets - truth[idx]))
    return float(np.median(d) * 1000)


def truth_p75_ms(onsets: np.ndarray, truth: np.ndarray) -> float:
    """75th-percentile |onset - nearest true time| in ms over the onsets within half a period of
    the true times' span (a detector's self-check on an unprocessed clip, in the grid judge's
    statistic: a perfect conform cannot score below it)."""
    if len(truth) < 2:
        return float("nan")
    half = float(np.median(np.diff(truth))) / 2
    onsets = onsets[(onsets > truth[0] - half) & (onsets < truth[-1] + half)]
    if len(onsets) == 0:
        return float("nan")
    idx = np.clip(np.searchsorted(truth, onsets), 1, len(truth) - 1)
    d = np.minimum(np.abs(onsets - truth[idx - 1]), np.abs(onsets - truth[idx]))
    return float(np.percentile(d, 75) * 1000)
