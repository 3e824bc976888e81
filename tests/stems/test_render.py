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


_STEREO_RENDER = """
import numpy as np
from stems.render import render_stem
sr = 32000
audio = (0.05 * np.random.default_rng(0).standard_normal((2, 11 * sr))).astype(np.float32)
for beat in range(18):  # clicks at 100 BPM
    audio[:, int(beat * 0.6 * sr): int(beat * 0.6 * sr) + 400] += 0.8
print("method", render_stem(audio, sr, bpm=120.0, duration_seconds=10.0).tempo.method)
"""


def test_warm_up_fills_a_numba_cache_from_which_a_new_process_renders_without_compiling(tmp_path):
    """What the Docker image and ``make install`` rely on (see deploy/Dockerfile).

    librosa's numba functions are compiled on first use and cached on disk; a worker started
    without that cache compiles for 20-30 s. A process that only ran ``warm_up`` must leave every
    function a real stem needs (stereo, another tempo) in the cache, for a CPU-agnostic target.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "generic",
           "NUMBA_DEBUG_CACHE": "1"}

    def run(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    first = run("from stems.render import warm_up; warm_up()")
    assert "[cache] data saved to" in first
    second = run(_STEREO_RENDER)
    assert "method beat-warp" in second
    assert "[cache] data loaded from" in second
    assert "[cache] data saved to" not in second  # nothing compiled
