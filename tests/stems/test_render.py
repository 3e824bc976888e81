"""stems.render: conform + loudness + WAV encoding of one stem, and the worker's render warm-up."""

import numpy as np
import pytest

from stems.audio import decode_audio
from stems.render import bars_for, render_stem, warm_up


@pytest.mark.parametrize(("seconds", "bpm", "bars"), [(10.0, 120.0, 5), (10.0, 90.0, 4), (0.5, 120.0, 1)])
def test_bars_for_takes_the_closest_whole_bar_count(seconds, bpm, bars):
    assert bars_for(seconds, bpm) == bars


def test_render_stem_gives_a_wav_of_whole_bars_at_the_target_loudness():
    sr, bpm = 16000, 120.0
    rng = np.random.default_rng(3)
    audio = (0.05 * rng.standard_normal((2, int(11 * sr)))).astype(np.float32)
    rendered = render_stem(audio, sr, bpm=bpm, duration_seconds=10.0, target_lufs=-16.0)
    decoded, rate = decode_audio(rendered.data)
    assert rate == sr and decoded.shape == (2, round(5 * 4 * 60 / bpm * sr))
    assert rendered.duration_seconds == pytest.approx(10.0)
    meta = rendered.metadata()
    assert meta["tempo"]["bars"] == 5 and meta["channels"] == 2 and meta["format"] == "wav"
    assert meta["loudness"]["integrated_lufs"] == pytest.approx(-16.0, abs=0.5)


def test_warm_up_runs_the_beat_warp_path():
    rendered = warm_up(32000)
    assert rendered.sample_rate == 32000 and rendered.duration_seconds == pytest.approx(4.0)
    assert rendered.tempo.method == "beat-warp"  # beat tracker and Rubber Band stretch both ran
    assert rendered.tempo.source_bpm == pytest.approx(118.0, abs=0.5)
