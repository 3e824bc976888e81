"""Separator on a tiny random-weight HTDemucs, loaded by name through demucs.pretrained.get_model."""

import numpy as np
import pytest
import torch

from stems.checkpoint import DEMUCS_SOURCES, write_tiny_demucs
from stems.separation import (
    ENERGY_FLOOR_DB,
    SeparationError,
    Separator,
    stem_energy_db,
)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch-home")
    write_tiny_demucs(home, "htdemucs_6s")
    write_tiny_demucs(home, "htdemucs")
    with pytest.MonkeyPatch.context() as mp:
        # torch.hub reads TORCH_HOME at each call unless set_dir pinned a directory.
        mp.setattr(torch.hub, "_hub_dir", None)
        mp.setenv("TORCH_HOME", str(home))
        mp.setattr(torch.hub, "download_url_to_file",
                   lambda url, *a, **k: pytest.fail(f"tried to download {url}"))
        yield home


@pytest.fixture(scope="module")
def separator(torch_home):
    # One thread: on a busy 2-core machine two intra-op threads ran ~10x slower than one.
    return Separator(num_threads=1)


def _noise(channels, seconds, rate, seed=0):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((channels, int(seconds * rate)))).astype(np.float32)


def test_model_facts(separator):
    assert separator.sources == DEMUCS_SOURCES["htdemucs_6s"]
    assert separator.samplerate == 44100


def test_stereo_32k_stems_keep_shape(separator):
    mix = _noise(2, 1.0, 32000)
    out = separator.separate(mix, 32000, ["guitar", "bass", "drums"])
    assert list(out) == ["guitar", "bass", "drums"]
    for stem in out.values():
        assert stem.shape == mix.shape and stem.dtype == np.float32
        assert np.isfinite(stem).all() and np.abs(stem).max() > 0


def test_mono_odd_length_gives_mono_stems_of_that_length(separator):
    mix = _noise(1, 0.71, 32000)[:, :22_401]
    out = separator.separate(mix, 32000, ["drums"])
    assert out["drums"].shape == (1, 22_401)


def test_all_sources_at_the_model_rate(separator):
    mix = _noise(2, 0.5, 44100)
    out = separator.separate(mix, 44100)
    assert tuple(out) == separator.sources
    assert all(stem.shape == mix.shape for stem in out.values())


def test_unknown_stem_names_stem_and_sources(torch_home):
    four = Separator("htdemucs")
    with pytest.raises(SeparationError, match=r"'guitar'.*drums, bass, other, vocals"):
        four.separate(_noise(2, 0.1, 32000), 32000, ["drums", "guitar"])


def test_silence_stays_finite(separator):
    out = separator.separate(np.zeros((2, 8000), np.float32), 32000, ["bass"])
    assert np.isfinite(out["bass"]).all()


def test_bad_input(separator):
    for bad in (np.zeros(100, np.float32), np.zeros((3, 100), np.float32),
                np.zeros((2, 0), np.float32), np.full((1, 100), np.nan, np.float32)):
        with pytest.raises(ValueError):
            separator.separate(bad, 32000)


def test_load_errors_are_typed(torch_home):
    with pytest.raises(SeparationError, match="no_such_model"):
        Separator("no_such_model")
    with pytest.raises(ValueError):
        Separator(overlap=1.0)
    with pytest.raises(ValueError, match="maximum"):
        Separator(segment=60.0)


def test_stem_energy_db():
    mix = _noise(2, 0.5, 32000)
    assert stem_energy_db(mix, mix) == pytest.approx(0.0)
    assert stem_energy_db(0.1 * mix, mix) == pytest.approx(-20.0)
    assert stem_energy_db(0.1 * mix[:1], mix) == pytest.approx(-20.0, abs=0.2)  # mono vs stereo
    assert stem_energy_db(np.zeros_like(mix), mix) == ENERGY_FLOOR_DB
    assert stem_energy_db(mix, np.zeros_like(mix)) == ENERGY_FLOOR_DB


def test_tiny_separator_is_written_on_first_use(tmp_path, monkeypatch):
    from stems.separation import Separator

    monkeypatch.setenv("STEMGEN_CACHE_DIR", str(tmp_path))
    separator = Separator("tiny", num_threads=1)
    assert "guitar" in separator.sources and separator.samplerate == 44100
    parts = separator.separate(np.zeros((1, 16000), np.float32) + 0.01, 32000, ["bass"])
    assert parts["bass"].shape == (1, 16000)
    assert Separator("tiny", num_threads=1).sources == separator.sources  # reuses the file
