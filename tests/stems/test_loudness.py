"""stems.loudness: BS.1770-4 loudness targets and the x4 true-peak ceiling."""

import json

import numpy as np
import pytest

from stems.loudness import LoudnessReport, integrated_loudness, normalize_loudness, true_peak_dbtp

SR = 48000


def sine(freq: float, seconds: float, dbfs: float, channels: int = 2, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return np.tile(10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t), (channels, 1))


def clicks(seconds: float, sr: int = SR) -> np.ndarray:
    """Sparse drum-like hits: a very high peak-to-loudness ratio."""
    rng = np.random.default_rng(0)
    x = np.zeros((1, int(seconds * sr)))
    hit = rng.standard_normal(2000) * np.exp(-np.arange(2000) / 150)
    for i in range(0, x.shape[1] - 2000, sr // 2):
        x[0, i:i + 2000] += hit
    return 0.5 * x / np.abs(x).max()


def test_bs1770_reference_sine():
    # BS.1770: a 997 Hz sine at -20 dBFS in both channels of a stereo pair reads -20 LUFS
    # (0 dBFS in one channel is -3.01 LUFS; two channels add 3.01 dB)
    assert integrated_loudness(sine(997.0, 5.0, -20.0), SR) == pytest.approx(-20.0, abs=0.1)


def test_true_peak_sees_inter_sample_peaks():
    # fs/4 sine at 45 degrees phase: every sample is at 0.707 of the waveform's true peak
    n = np.arange(SR)
    x = (0.9 * np.sin(2 * np.pi * n / 4 + np.pi / 4))[np.newaxis]
    sample_peak_db = 20 * np.log10(np.abs(x).max())
    tp = true_peak_dbtp(x, SR)
    assert tp == pytest.approx(20 * np.log10(0.9), abs=0.3)
    assert tp > sample_peak_db + 2.5


@pytest.mark.parametrize("target", [-14.0, -23.0])
def test_normalises_to_the_target(target):
    x = sine(440.0, 5.0, -30.0)
    y, report = normalize_loudness(x, SR, target_lufs=target)
    assert isinstance(report, LoudnessReport)
    assert report.integrated_lufs == pytest.approx(target, abs=0.1)
    assert integrated_loudness(y, SR) == pytest.approx(target, abs=0.1)
    assert report.true_peak_dbtp <= -1.0
    assert report.gain_db == pytest.approx(target - integrated_loudness(x, SR), abs=0.01)
    assert y.dtype == np.float32 and y.shape == (2, 5 * SR)


def test_loud_input_is_turned_down():
    x = sine(440.0, 5.0, -3.0)
    _, report = normalize_loudness(x, SR)
    assert report.gain_db < 0
    assert report.integrated_lufs == pytest.approx(-14.0, abs=0.1)


def test_peaky_material_respects_the_true_peak_ceiling():
    y, report = normalize_loudness(clicks(6.0), SR, target_lufs=-9.0, max_true_peak_dbtp=-1.0)
    assert true_peak_dbtp(y, SR) <= -1.0 + 1e-6
    assert report.true_peak_dbtp <= -1.0 + 1e-6
    assert report.limited_db >= -6.5  # bounded limiting ...
    assert report.integrated_lufs <= -9.0 + 0.1  # ... so it may stay under the target, and says so


def test_limiter_reaches_the_target_when_a_little_limiting_suffices():
    rng = np.random.default_rng(1)
    x = 0.05 * rng.standard_normal((2, SR * 6))
    x[:, SR * 3] = 0.9  # one stray peak
    y, report = normalize_loudness(x, SR, target_lufs=-14.0)
    assert report.integrated_lufs == pytest.approx(-14.0, abs=0.1)
    assert true_peak_dbtp(y, SR) <= -1.0 + 1e-6


@pytest.mark.parametrize("x", [np.zeros((2, SR * 2)), np.zeros((1, 100))])
def test_silence_gets_no_gain(x):
    y, report = normalize_loudness(x, SR)
    assert report.gain_db == 0.0
    assert report.integrated_lufs is None
    assert np.all(y == 0)
    assert json.loads(json.dumps(report.to_dict()))["integrated_lufs"] is None


def test_too_short_for_bs1770_gets_no_gain():
    x = sine(440.0, 0.2, -20.0)
    y, report = normalize_loudness(x, SR)
    assert report.gain_db == 0.0
    assert report.integrated_lufs is None
    assert np.allclose(y, x, atol=1e-6)
    assert report.true_peak_dbtp == pytest.approx(-20.0, abs=0.2)


def test_mono_1d_and_other_rates():
    x = sine(440.0, 3.0, -25.0, channels=1, sr=32000)[0]
    y, report = normalize_loudness(x, 32000)
    assert y.ndim == 1 and len(y) == len(x)
    assert report.integrated_lufs == pytest.approx(-14.0, abs=0.1)


def test_report_is_json_serialisable():
    _, report = normalize_loudness(sine(440.0, 2.0, -20.0), SR)
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) >= {"integrated_lufs", "true_peak_dbtp", "gain_db"}


def test_bad_input():
    with pytest.raises(ValueError):
        normalize_loudness(np.full((1, SR), np.nan), SR)
    with pytest.raises(ValueError):
        normalize_loudness(np.zeros((1, SR)), 0)
