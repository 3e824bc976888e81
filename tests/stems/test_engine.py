"""The engine on a tiny random-weight checkpoint, loaded through MusicGen.get_pretrained."""

import numpy as np
import pytest

from stems.checkpoint import is_checkpoint_dir, write_checkpoint
from stems.engine import ModelLoadError, SamplingParams, StemEngine, resolve_device


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=1)
    return StemEngine(str(directory), device="cpu")


def test_checkpoint_files(tmp_path):
    write_checkpoint(tmp_path, "tiny")
    assert is_checkpoint_dir(tmp_path)
    assert (tmp_path / "state_dict.bin").stat().st_size < 5_000_000
    assert not is_checkpoint_dir(tmp_path / "missing")


def test_generate_batch_shape_and_progress(engine):
    seen = []
    audio = engine.generate(["a", "b", "c"], 1.0, progress=seen.append)
    assert audio.shape == (3, 1, 32000)
    assert audio.dtype == np.float32
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 10
    assert engine.sample_rate == 32000


def test_seed_repeats(engine):
    params = SamplingParams(top_k=50)
    a = engine.generate(["x"], 0.5, sampling=params, seed=3)
    b = engine.generate(["x"], 0.5, sampling=params, seed=3)
    c = engine.generate(["x"], 0.5, sampling=params, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_longer_than_max_duration_extends(tmp_path):
    # audiocraft needs max_duration > its default extend stride (18 s).
    directory = write_checkpoint(tmp_path, "tiny", max_duration_seconds=19.0)
    engine = StemEngine(str(directory), device="cpu")
    assert engine.max_duration_seconds == 19.0
    seen = []
    assert engine.generate(["x"], 20.0, progress=seen.append).shape[-1] == 20 * 32000
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0, abs=0.01)


def test_bad_arguments(engine):
    with pytest.raises(ValueError):
        engine.generate([], 1.0)
    with pytest.raises(ValueError):
        engine.generate(["x"], 0)


def test_missing_model_is_typed(tmp_path):
    with pytest.raises(ModelLoadError):
        StemEngine(str(tmp_path / "nothing-here"), device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")


def test_continuation_returns_only_what_follows_the_prompt(engine):
    from stems.engine import AudioConditioning

    prompt = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16000)).astype(np.float32)  # 1 s stereo
    conditioning = AudioConditioning("continuation", prompt, 16000, "song")
    seen = []
    audio = engine.generate(["bass", "drums"], 1.5, conditioning=conditioning, seed=3,
                            progress=seen.append)
    assert audio.shape == (2, 1, 48000)
    assert np.isfinite(audio).all()
    assert seen[-1] == pytest.approx(1.0)
    assert not engine.supports_melody


def test_chroma_needs_a_melody_model(engine):
    from stems.engine import AudioConditioning

    chroma = AudioConditioning("chroma", np.zeros((1, 32000), np.float32), 32000, "plan")
    with pytest.raises(ValueError, match="not a melody model"):
        engine.generate(["bass"], 1.0, conditioning=chroma)
    with pytest.raises(ValueError):
        AudioConditioning("reverb", np.zeros((1, 10), np.float32), 32000, "x")
    with pytest.raises(ValueError):
        AudioConditioning("chroma", np.zeros(10, np.float32), 32000, "x")


def test_tiny_melody_model_follows_a_chromagram(tmp_path, monkeypatch):
    from stems.engine import AudioConditioning

    monkeypatch.setenv("STEMGEN_CACHE_DIR", str(tmp_path))
    engine = StemEngine("tiny-melody", device="cpu")
    assert engine.supports_melody
    rate = 32000
    t = np.arange(rate * 2) / rate
    chords = (np.sin(2 * np.pi * 220 * t) + np.sin(2 * np.pi * 261.6 * t))[None].astype(np.float32)
    chroma = AudioConditioning("chroma", chords, rate, "am")
    a = engine.generate(["bass", "guitar"], 1.0, conditioning=chroma, seed=5)
    b = engine.generate(["bass", "guitar"], 1.0, conditioning=chroma, seed=5)
    assert a.shape == (2, 1, rate) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    plain = engine.generate(["drums"], 1.0, seed=5)  # no chroma: the melody model still generates
    assert plain.shape == (1, 1, rate)
