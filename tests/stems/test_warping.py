"""stems.warping.conform_to_beats: a stem with known beats warped onto a drifting beat map.

Output timing is judged with the plain threshold click detector of test_tempo, not with the
analysis inside stems.beats.
"""

import json

import numpy as np
import pytest

from stems.tempo import TempoError
from stems.warping import conform_to_beats, conform_to_bpm
from tests.stems.test_tempo import click_times, detect_clicks, render_clicks

SR = 32000


def drifting_map(bpm: float, beats: int, drift: float) -> np.ndarray:
    """Beat times from 0.0, the tempo ramping linearly by ``drift`` (fraction) over the map."""
    t, out = 0.0, [0.0]
    for k in range(beats):
        t += 60.0 / (bpm * (1.0 + drift * k / beats))
        out.append(t)
    return np.asarray(out)


def test_beats_land_on_a_drifting_map():
    seconds = 10.0
    stem = render_clicks(click_times(120.0, seconds, start=0.2), SR, seconds)
    target = drifting_map(120.0, 16, 0.03)
    result = conform_to_beats(stem, SR, target)
    a = result.analysis
    assert a.grid == "song-beats" and a.method == "beat-warp" and a.bars == 4
    assert result.audio.shape == (1, int(round(target[-1] * SR)))
    onsets = detect_clicks(result.audio, SR)
    # every click near its map beat
    err = np.array([np.min(np.abs(target[:-1] - t)) for t in onsets])
    assert len(onsets) >= 15
    assert np.max(err) < 0.005, err
    assert abs(a.target_bpm - 60.0 * 16 / target[-1]) < 1e-6
    d = json.loads(json.dumps(a.to_dict()))
    assert d["grid"] == "song-beats"


def test_bars_longer_than_the_map_extrapolate_its_last_period():
    seconds = 10.0
    stem = render_clicks(click_times(120.0, seconds, start=0.2), SR, seconds)
    target = drifting_map(120.0, 4, 0.0)
    result = conform_to_beats(stem, SR, target, bars=2)
    assert result.audio.shape[1] == int(round(4.0 * SR))


def test_no_pulse_is_warped_at_nominal_beats():
    rng = np.random.default_rng(0)
    pad = (rng.standard_normal((1, 8 * SR)) * 0.1).astype(np.float32)
    target = drifting_map(120.0, 8, 0.03)
    result = conform_to_beats(pad, SR, target)
    assert result.analysis.grid == "song-beats"
    assert result.analysis.method == "nominal-beat-warp"
    assert result.audio.shape[1] == int(round(target[-1] * SR))


def test_constant_grid_reports_constant_bpm():
    stem = render_clicks(click_times(120.0, 8.0), SR, 8.0)
    assert conform_to_bpm(stem, SR, 120.0).analysis.grid == "constant-bpm"


@pytest.mark.parametrize("target", [[0.0], [0.1, 0.6, 1.1], [0.0, 0.5, 0.5], [0.0, float("nan")], "x"])
def test_bad_beat_maps_are_typed_errors(target):
    with pytest.raises(TempoError):
        conform_to_beats(np.zeros((1, SR)), SR, target)
