"""The worker's model cache builds its engine from the settings: model, device, torch thread count,
attention backend, decoding mode, precision and batch buckets (StemEngine itself is faked:
loading is tested in tests/stems)."""

import pytest

from stemgen_settings import load_settings
from tasks import model_cache


@pytest.fixture
def built(monkeypatch):
    calls = []

    class FakeEngine:
        def __init__(self, model, device, **options):
            calls.append((model, device, options))

    monkeypatch.setattr(model_cache, "StemEngine", FakeEngine)
    monkeypatch.setattr(model_cache, "_engines", {})
    return calls


def test_engine_gets_thread_count_attention_backend_and_decoding(built):
    settings = load_settings(musicgen_model="tiny", stemgen_device="cuda", torch_num_threads=3,
                             attention_backend="xformers", engine_mode="eager",
                             engine_precision="bfloat16", batch_max_size=24)
    engine = model_cache.engine_for(settings)
    assert built == [("tiny", "cuda", {"num_threads": 3, "attention_backend": "xformers",
                                       "mode": "eager", "precision": "bfloat16",
                                       "buckets": (1, 2, 4, 8, 16, 24)})]
    assert model_cache.engine_for(settings) is engine  # loaded once per process


def test_zero_threads_leaves_torch_its_default_on_cpu_and_one_thread_on_cuda(built):
    model_cache.engine_for(load_settings(musicgen_model="tiny", stemgen_device="cpu"))
    assert built[0][2] == {"num_threads": None, "attention_backend": "torch", "mode": "auto",
                           "precision": "auto", "buckets": (1, 2, 4, 6)}
    model_cache.engine_for(load_settings(musicgen_model="tiny", stemgen_device="cuda"))
    assert built[1][2]["num_threads"] == 1


def test_unknown_engine_mode_is_refused():
    with pytest.raises(ValueError):
        load_settings(engine_mode="fast")


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError):
        load_settings(attention_backend="flash")
