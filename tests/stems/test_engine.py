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
