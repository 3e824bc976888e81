"""The engine's speed settings change speed only: same clips, bit for bit, as plain audiocraft.

No timings here (they live in bench/); these tests pin what the settings may not change.
"""

import threading

import numpy as np
import pytest
from torch.overrides import TorchFunctionMode

from stems.batching import StemBatcher
from stems.checkpoint import write_checkpoint
from stems.engine import StemEngine, install_streaming_caches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=2))


# float32: audiocraft's own CPU arithmetic, untouched (a half layout on CPU also attends in
# float32, a change of its own: tests/stems/test_decoding.py)
@pytest.fixture(scope="module")
def plain(checkpoint):
    return StemEngine(checkpoint, device="cpu", kv_buffer=False, cross_attention_cache=False,
                      precision="float32")


@pytest.fixture(scope="module")
def cached(checkpoint):
    return StemEngine(checkpoint, device="cpu", precision="float32")


@pytest.mark.parametrize("prompts", [["one"], ["guitar", "bass", "drums"]])
def test_streaming_caches_leave_clips_bitwise_equal(plain, cached, prompts):
    a = plain.generate(prompts, 1.0, seed=7)
    b = cached.generate(prompts, 1.0, seed=7)
    assert np.array_equal(a, b)


def test_streaming_caches_across_extension_windows(tmp_path):
    # Beyond max_duration audiocraft continues from a prompt of past tokens: the first step of
    # each later window appends many keys at once.
    directory = str(write_checkpoint(tmp_path, "tiny", max_duration_seconds=19.0))
    a = StemEngine(directory, device="cpu", kv_buffer=False, cross_attention_cache=False)
    b = StemEngine(directory, device="cpu")
    assert np.array_equal(a.generate(["x", "y"], 19.5, seed=3), b.generate(["x", "y"], 19.5, seed=3))


def test_caches_are_per_instance(plain, cached):
    from audiocraft.modules.transformer import StreamingMultiheadAttention

    layers = [m for m in cached._model.lm.modules() if isinstance(m, StreamingMultiheadAttention)]
    assert layers and all("forward" in vars(m) or "_complete_kv" in vars(m) for m in layers)
    untouched = [m for m in plain._model.lm.modules() if isinstance(m, StreamingMultiheadAttention)]
    assert not any("forward" in vars(m) or "_complete_kv" in vars(m) for m in untouched)
    # tiny: 2 layers, each with one self- and one cross-attention
    assert install_streaming_caches(plain._model.lm, kv_buffer=False, cross_attention_cache=False) == 0
    assert cached.settings["kv_buffer"] and cached.settings["cross_attention_cache"]


def test_num_threads_applies_on_the_generating_thread(checkpoint):
    import torch

    engine = StemEngine(checkpoint, device="cpu", num_threads=1)
    seen = []
    # generate runs on another thread (as the batcher's); progress is called on that thread.
    thread = threading.Thread(target=engine.generate, args=(["x"], 0.2),
                              kwargs={"progress": lambda _f: seen.append(torch.get_num_threads())})
    thread.start()
    thread.join(120)
    assert seen and set(seen) == {1}
    assert engine.settings["num_threads"] == 1


def test_bad_settings(checkpoint):
    with pytest.raises(ValueError):
        StemEngine(checkpoint, device="cpu", attention_backend="flash-please")
    with pytest.raises(ValueError):
        StemEngine(checkpoint, device="cpu", num_threads=0)


class _CountHostReads(TorchFunctionMode):
    """Counts Python-level reads of tensor values (each one a device→host sync on CUDA)."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_host_reads_per_decoding_step(cached):
    # On CUDA every such read stalls the GPU; their number must not grow with the clip's length
    # (our progress callback and audiocraft's per-step code read nothing back).
    counts = []
    for duration in (0.3, 0.9):
        with _CountHostReads() as mode:
            cached.generate(["x"], duration, progress=lambda _f: None)
        counts.append(mode.count)
    assert counts[0] == counts[1]


class _FakeEngine:
    sample_rate = 10

    def __init__(self, on_generate=None):
        self.on_generate = on_generate

    def generate(self, prompts, duration_seconds, *, sampling, seed, progress, conditioning=None):
        if progress is not None:
            for step in range(1, 11):
                progress(step / 10)
        if self.on_generate is not None:
            self.on_generate()
        return np.zeros((len(prompts), 1, int(round(duration_seconds * self.sample_rate))), np.float32)


def test_slow_progress_sink_does_not_hold_the_model():
    # The sink blocks until the model call has returned: were it called on the generation
    # thread, the call could never return and this test would hang (bounded by the timeouts).
    returned = threading.Event()
    batcher = StemBatcher(_FakeEngine(on_generate=returned.set), window_seconds=0)
    seen = []

    def sink(fraction):
        assert returned.wait(30), "progress was delivered on the generation thread"
        seen.append(fraction)

    clip = batcher.generate("x", 1.0, progress=sink, timeout=60)
    assert clip.shape == (1, 10)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_stopped_generation_thread_fails_callers_instead_of_hanging():
    class Dying(_FakeEngine):
        def generate(self, *args, **kwargs):
            raise SystemExit("interpreter shutting down")

    batcher = StemBatcher(Dying(), window_seconds=0)
    with pytest.raises(SystemExit):
        batcher.generate("x", 1.0, timeout=30)
    batcher._thread.join(30)
    with pytest.raises(RuntimeError):
        batcher.generate("y", 1.0, timeout=30)
