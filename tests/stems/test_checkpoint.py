"""Random-weight checkpoints loaded through the libraries' own loaders, offline.

Tiny HTDemucs through ``demucs.pretrained.get_model`` (torch.hub's cache under TORCH_HOME), a tiny
melody MusicGen through ``MusicGen.get_pretrained`` (its chroma conditioner loads "htdemucs").
"""

import os

import numpy as np
import pytest
import torch

from stems.checkpoint import (
    DEMUCS_SOURCES,
    demucs_checkpoint_path,
    is_checkpoint_dir,
    lm_config,
    melody_environment,
    melody_torch_home,
    torch_home_environment,
    write_checkpoint,
    write_tiny_demucs,
)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME in a tmp dir, and a download through torch.hub fails the test."""
    # torch.hub reads TORCH_HOME at each call unless set_dir pinned a directory (kept here).
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path


def test_demucs_path_is_the_hub_cache_file(tmp_path):
    # The file names of demucs 4.0.1's remote list (demucs/remote/files.txt, <name>.yaml).
    assert demucs_checkpoint_path(tmp_path, "htdemucs") == (
        tmp_path / "hub" / "checkpoints" / "955717e8-8726e21a.th")
    assert demucs_checkpoint_path(tmp_path, "htdemucs_6s") == (
        tmp_path / "hub" / "checkpoints" / "5c90dfd2-34c22ccb.th")
    with pytest.raises(ValueError, match="mdx"):
        demucs_checkpoint_path(tmp_path, "mdx")


@pytest.mark.parametrize("name", ["htdemucs", "htdemucs_6s"])
def test_tiny_demucs_loads_through_get_model(offline_torch_home, name):
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs
    from demucs.pretrained import get_model

    path = write_tiny_demucs(offline_torch_home, name)
    assert path == demucs_checkpoint_path(offline_torch_home, name) and path.is_file()
    assert path.stat().st_size < 2_000_000
    model = get_model(name)
    assert isinstance(model, BagOfModels) and isinstance(model.models[0], HTDemucs)
    assert tuple(model.sources) == DEMUCS_SOURCES[name]
    assert model.samplerate == 44100 and model.audio_channels == 2
    assert not model.training


def test_tiny_demucs_is_seeded(tmp_path):
    from demucs.states import load_model

    a = load_model(torch.load(write_tiny_demucs(tmp_path / "a", seed=3), weights_only=False))
    b = load_model(torch.load(write_tiny_demucs(tmp_path / "b", seed=3), weights_only=False))
    c = load_model(torch.load(write_tiny_demucs(tmp_path / "c", seed=4), weights_only=False))
    key = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ValueError):
        write_tiny_demucs(tmp_path, segment_seconds=0)


def test_torch_home_environment_restores(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", "/previous")
    with torch_home_environment(tmp_path) as home:
        assert home == tmp_path and torch.hub.get_dir() == str(tmp_path / "hub")
    assert os.environ["TORCH_HOME"] == "/previous"
    monkeypatch.delenv("TORCH_HOME")
    with torch_home_environment(tmp_path):
        pass
    assert "TORCH_HOME" not in os.environ
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "pinned"))
    with pytest.raises(RuntimeError, match="set_dir"):
        with torch_home_environment(tmp_path):
            pass
    assert "TORCH_HOME" not in os.environ


def test_melody_config_is_chroma2music():
    cfg = lm_config("tiny", melody=True)
    assert cfg["conditioners"]["self_wav"]["model"] == "chroma_stem"
    assert cfg["conditioners"]["self_wav"]["chroma_stem"]["sample_rate"] == 32000
    assert cfg["fuser"]["prepend"] == ["self_wav", "description"] and cfg["fuser"]["cross"] == []
    assert "self_wav" not in lm_config("tiny")["conditioners"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a busy 2-core machine two intra-op threads ran ~10x slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def melody_model(tmp_path_factory):
    from audiocraft.models import MusicGen

    # 19 s: the shortest max_duration MusicGen takes (above its 18 s extend stride); the chroma
    # prepended to the tokens covers that duration.
    directory = write_checkpoint(tmp_path_factory.mktemp("melody"), "tiny", melody=True,
                                 max_duration_seconds=19.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "_hub_dir", None)
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("elsewhere")))  # restored after
        with melody_environment(directory):
            model = MusicGen.get_pretrained(str(directory), device="cpu")
    model.set_generation_params(duration=0.5, top_k=50)
    return directory, model


def test_melody_checkpoint_layout(melody_model):
    directory, model = melody_model
    from audiocraft.modules.conditioners import ChromaStemConditioner

    assert is_checkpoint_dir(directory)
    assert demucs_checkpoint_path(melody_torch_home(directory), "htdemucs").is_file()
    conditioner = model.lm.condition_provider.conditioners["self_wav"]
    assert isinstance(conditioner, ChromaStemConditioner)
    assert tuple(conditioner.demucs.sources) == DEMUCS_SOURCES["htdemucs"]


def test_generate_with_chroma(melody_model):
    _, model = melody_model
    torch.manual_seed(0)
    melody = 0.1 * torch.randn(2, 1, 16000)
    wav = model.generate_with_chroma(["guitar riff", "bass line"], melody, 32000)
    assert wav.shape == (2, 1, 16000)
    assert torch.isfinite(wav).all()


def test_generate_with_chroma_mixes_none_and_other_rates(melody_model):
    _, model = melody_model
    # A drums row has no melody; audiocraft converts the others (stereo 44.1 kHz here) itself.
    melodies = [0.1 * torch.randn(2, 22050), None]
    wav = model.generate_with_chroma(["guitar", "drums"], melodies, 44100)
    assert wav.shape == (2, 1, 16000)


def test_text_checkpoint_continues_a_prompt(tmp_path):
    from audiocraft.models import MusicGen

    model = MusicGen.get_pretrained(str(write_checkpoint(tmp_path, "tiny")), device="cpu")
    model.set_generation_params(duration=0.5, top_k=50)
    prompt = 0.1 * torch.randn(2, 1, 8000)  # 0.25 s at 32 kHz
    wav = model.generate_continuation(prompt, 32000, ["a", "b"])
    assert wav.shape == (2, 1, 16000)  # the prompt and its continuation
    assert np.isfinite(wav.numpy()).all()
