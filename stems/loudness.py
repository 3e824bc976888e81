"""Loudness normalisation to an integrated-loudness target with a true-peak ceiling.

Integrated loudness is ITU-R BS.1770-4 (K-weighting, 400 ms blocks, absolute -70 LUFS and
relative -10 LU gates) as measured by pyloudnorm. True peak follows BS.1770-4 Annex 2: the
signal is oversampled x4 (polyphase FIR, ``scipy.signal.resample_poly``) and the largest absolute
sample is taken, in dBTP.

``normalize_loudness`` applies the gain that reaches the target loudness; where that gain would
push the true peak above the ceiling, a look-ahead peak limiter (instant attack over a 2 ms
look-ahead, 80 ms release, gain computed on the x4 oversampled peaks) holds the peaks down so
the loudness target is still met, with at most MAX_LIMITING_DB of gain reduction: very peaky
material (sparse drums) then ends up quieter than the target rather than crushed. A final
static trim guarantees the ceiling. Every value in the report is measured on the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyloudnorm
from scipy.signal import resample_poly

__all__ = ["LoudnessReport", "normalize_loudness", "integrated_loudness", "true_peak_dbtp"]

_MIN_SECONDS = 0.4          # one BS.1770 gating block
_OVERSAMPLE = 4
_LOOKAHEAD_S = 0.002
_RELEASE_S = 0.080
_BLOCK_S = 0.001
MAX_LIMITING_DB = 6.0       # deepest peak limiting allowed to reach the loudness target


@dataclass(frozen=True)
class LoudnessReport:
    """Measured on the normalised output."""

    integrated_lufs: float | None  # LUFS; None for silence or audio shorter than 0.4 s
    true_peak_dbtp: float          # dBTP; -inf for digital silence
    gain_db: float                 # static gain applied, dB (limiting not included)
    limited_db: float = 0.0        # deepest peak-limiter gain reduction, dB (<= 0)

    def to_dict(self) -> dict:
        """JSON-serialisable dict; non-finite numbers become None."""

        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 3)

        return {"integrated_lufs": clean(self.integrated_lufs), "true_peak_dbtp": clean(self.true_peak_dbtp),
                "gain_db": clean(self.gain_db), "limited_db": clean(self.limited_db)}


def _as_channels(audio: np.ndarray) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 1:
        x = x[np.newaxis, :]
    if x.ndim != 2:
        raise ValueError(f"audio must be [channels, samples], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("audio contains NaN or infinite samples")
    return x


def true_peak_dbtp(audio: np.ndarray, sample_rate: int) -> float:
    """True peak of ``audio`` [channels, samples] in dBTP (BS.1770-4 Annex 2, x4 oversampling);
    -inf for digital silence."""
    x = _as_channels(audio)
    if x.shape[1] == 0:
        return float("-inf")
    peak = float(np.max(np.abs(_oversampled(x))))
    return 20.0 * math.log10(peak) if peak > 0 else float("-inf")


def _oversampled(x: np.ndarray) -> np.ndarray:
    return resample_poly(x, _OVERSAMPLE, 1, axis=1)


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float | None:
    """BS.1770-4 integrated loudness of ``audio`` [channels, samples] in LUFS (pyloudnorm);
    None for audio shorter than 0.4 s or below the -70 LUFS absolute gate (silence)."""
    x = _as_channels(audio)
    if x.shape[1] < int(math.ceil(_MIN_SECONDS * sample_rate)):
        return None
    meter = pyloudnorm.Meter(sample_rate)  # K-weighting, 400 ms blocks, BS.1770-4 gating
    value = float(meter.integrated_loudness(x.T))
    return value if math.isfinite(value) else None


def _limiter_gain(x: np.ndarray, sample_rate: int, ceiling: float) -> np.ndarray:
    """Per-sample gain (<= 1) that keeps the x4 oversampled peaks of x under ``ceiling``."""
    n = x.shape[1]
    peaks = np.abs(_oversampled(x)).max(axis=0)
    peaks = peaks[: n * _OVERSAMPLE].reshape(n, _OVERSAMPLE).max(axis=1)
    block = max(1, int(round(_BLOCK_S * sample_rate)))
    n_blocks = -(-n // block)
    padded = np.zeros(n_blocks * block)
    padded[:n] = peaks
    block_peak = padded.reshape(n_blocks, block).max(axis=1)
    need = np.minimum(1.0, ceiling / np.maximum(block_peak, 1e-12))
    # look-ahead: a block's gain already covers the peaks of the next few blocks (and the
    # previous one, so that interpolating between block centres never overshoots)
    ahead = max(1, int(round(_LOOKAHEAD_S / _BLOCK_S)))
    padded_need = np.concatenate((np.ones(1), need, np.ones(ahead)))
    window = np.lib.stride_tricks.sliding_window_view(padded_need, ahead + 2)
    need = window.min(axis=1)[:n_blocks]
    # instant attack, exponential release (in dB), one step per block
    coeff = math.exp(-_BLOCK_S / _RELEASE_S)
    need_db = 20.0 * np.log10(need)
    gain_db = np.empty_like(need_db)
    g = 0.0
    for i, target in enumerate(need_db):
        g = target if target < g else target + (g - target) * coeff
        gain_db[i] = g
    centres = (np.arange(n_blocks) + 0.5) * block
    return 10.0 ** (np.interp(np.arange(n), centres, gain_db) / 20.0)


def normalize_loudness(audio: np.ndarray, sample_rate: int, *, target_lufs: float = -14.0,
                       max_true_peak_dbtp: float = -1.0,
                       max_limiting_db: float = MAX_LIMITING_DB) -> tuple[np.ndarray, LoudnessReport]:
    """Normalise ``audio`` [channels, samples] (float, any sample rate in Hz) to ``target_lufs``
    integrated loudness (BS.1770-4) with true peak <= ``max_true_peak_dbtp`` dBTP.

    ``max_limiting_db`` bounds the peak limiting spent on reaching the target (MAX_LIMITING_DB);
    stems.render raises it by the headroom it takes below the ceiling for a lossy codec, so the
    codec's headroom costs limiting rather than loudness.

    Silence and audio shorter than 0.4 s (too short for BS.1770 gating) are returned unchanged
    (gain 0 dB); the report then has ``integrated_lufs=None`` and the measured true peak.

    Returns (float32 [channels, samples] audio, LoudnessReport measured on that output).
    Raises ValueError for a non-positive sample rate, a non-finite target, or audio that is not
    [channels, samples] / contains NaN or inf.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate!r}")
    if not (math.isfinite(target_lufs) and math.isfinite(max_true_peak_dbtp)
            and math.isfinite(max_limiting_db) and max_limiting_db >= 0):
        raise ValueError("target_lufs, max_true_peak_dbtp and max_limiting_db (>= 0) must be finite")
    x = _as_channels(audio)
    squeeze = np.asarray(audio).ndim == 1
    ceiling = 10.0 ** (max_true_peak_dbtp / 20.0)
    measured = integrated_loudness(x, sample_rate)
    if measured is None:
        out = x.astype(np.float32)
        report = LoudnessReport(integrated_lufs=None, true_peak_dbtp=true_peak_dbtp(out, sample_rate), gain_db=0.0)
        return (out[0] if squeeze else out), report

    peak_db = true_peak_dbtp(x, sample_rate)
    # Limiting deeper than this squashes drum transients audibly; past it the output stays
    # below the loudness target (and the report says so) rather than being crushed.
    gain_cap = max_true_peak_dbtp + max_limiting_db - peak_db

    def limited(gain_db: float) -> tuple[np.ndarray, float, float]:
        y = x * 10.0 ** (gain_db / 20.0)
        g = _limiter_gain(y, sample_rate, ceiling * 0.995)
        depth = float(20.0 * np.log10(g.min()))
        if depth < 0.0:
            y = y * g
        loud = integrated_loudness(y, sample_rate)
        return y, (loud if loud is not None else float("-inf")), depth

    # f(gain) = loudness after limiting is increasing in gain: secant search for the target
    gain_db = min(target_lufs - measured, gain_cap)
    y, loud, limited_db = limited(gain_db)
    prev = (gain_db - 1.0, loud - 1.0)
    for _ in range(6):
        if abs(target_lufs - loud) < 0.05 or (loud < target_lufs and gain_db >= gain_cap - 1e-9):
            break
        slope = (loud - prev[1]) / (gain_db - prev[0]) if gain_db != prev[0] else 1.0
        step = (target_lufs - loud) / max(slope, 0.05)
        prev = (gain_db, loud)
        gain_db = min(gain_db + step, gain_cap)
        y, loud, limited_db = limited(gain_db)
    # guarantee the ceiling (residual inter-sample overs after limiting)
    tp = true_peak_dbtp(y, sample_rate)
    if math.isfinite(tp) and tp > max_true_peak_dbtp:
        trim = max_true_peak_dbtp - tp - 0.001
        y = y * 10.0 ** (trim / 20.0)
        gain_db += trim
    out = y.astype(np.float32)
    report = LoudnessReport(integrated_lufs=integrated_loudness(out, sample_rate),
                            true_peak_dbtp=true_peak_dbtp(out, sample_rate), gain_db=float(gain_db),
                            limited_db=limited_db)
    return (out[0] if squeeze else out), report
