"""Static decoding (stems.decoding) against audiocraft's eager generate, on the same CPU.

"exact" must give bitwise the clips of eager; "static" (bucket padding, masked attention over a
fixed length: the step a CUDA graph captures) gives the same tokens on this CPU too, because its
random draws are made for the real rows only. The CUDA-graph capture itself runs only where CUDA
is present (last test).
"""

import numpy as np
import pytest
import torch

from stems.checkpoint import write_checkpoint
from stems.decoding import (DEFAULT_BUCKETS, Sampler, StaticDecoder, bucket_for, sample_next,
                            unsupported_reason)
from stems.engine import AudioConditioning, SamplingParams, StemEngine

PROMPTS = ["guitar riff", "bass line", "drum groove"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=4))


@pytest.fixture(scope="module")
def eager(checkpoint):
    return StemEngine(checkpoint, device="cpu", mode="eager")


@pytest.fixture(scope="module")
def exact(checkpoint):
    return StemEngine(checkpoint, device="cpu", mode="exact")


@pytest.fixture(scope="module")
def static(checkpoint):
    return StemEngine(checkpoint, device="cpu", mode="static", buckets=(1, 2, 4, 8))


def _conditions(prompts):
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={"description": p}) for p in prompts]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_exact_mode_is_bitwise_eager(eager, exact, prompts):
    assert np.array_equal(eager.generate(prompts, 1.5, seed=11), exact.generate(prompts, 1.5, seed=11))
    assert exact.decoder.stats.fallbacks == 0 and exact.decoder.stats.generations >= 1


def test_static_mode_pads_to_a_bucket_without_changing_tokens(eager, static):
    # 3 rows run in the 4-row bucket: the padded row is dropped and draws no random numbers
    before = static.decoder.stats.buckets_used.get(4, 0)
    a = eager.generate(PROMPTS, 1.5, seed=3)
    b = static.generate(PROMPTS, 1.5, seed=3)
    assert b.shape == a.shape == (3, 1, int(1.5 * eager.sample_rate))
    assert np.array_equal(a, b)
    assert static.decoder.stats.buckets_used[4] == before + 1


@pytest.mark.parametrize("bucket", [4, 8])
def test_static_step_tokens_equal_eager_tokens(eager, checkpoint, bucket):
    lm = StemEngine(checkpoint, device="cpu", mode="eager")._model.lm
    with torch.inference_mode():
        torch.manual_seed(1)
        reference = lm.generate(None, _conditions(PROMPTS + ["keys"]), max_gen_len=120)
        StaticDecoder(lm, shape="static", buckets=(bucket,), capacity_steps=200,
                      kv_chunk_steps=64).install()
        torch.manual_seed(1)
        tokens = lm.generate(None, _conditions(PROMPTS + ["keys"]), max_gen_len=120)
    assert tokens.shape == reference.shape == (4, lm.num_codebooks, 120)
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("sampling", [SamplingParams(top_p=0.9, top_k=0),
                                      SamplingParams(temperature=0.0),
                                      SamplingParams(top_k=20, temperature=0.7, cfg_coef=1.5)])
def test_sampling_settings(eager, exact, static, sampling):
    a = eager.generate(PROMPTS[:2], 1.0, seed=5, sampling=sampling)
    assert np.array_equal(a, exact.generate(PROMPTS[:2], 1.0, seed=5, sampling=sampling))
    assert np.array_equal(a, static.generate(PROMPTS[:2], 1.0, seed=5, sampling=sampling))


def test_sample_next_draws_what_torch_multinomial_draws():
    from audiocraft.utils import utils

    logits = torch.randn(3, 4, 300)
    for sampler, reference in (
            (Sampler(True, 1.0, 50, 0.0, 3.0), lambda p: utils.sample_top_k(p, 50)),
            (Sampler(True, 1.0, 0, 0.8, 3.0), lambda p: utils.sample_top_p(p, 0.8)),
            (Sampler(True, 1.0, 0, 0.0, 3.0), lambda p: utils.multinomial(p, 1))):
        torch.manual_seed(9)
        expected = reference(torch.softmax(logits, dim=-1))
        torch.manual_seed(9)
        assert torch.equal(sample_next(logits, sampler), expected)
    greedy = sample_next(logits, Sampler(False, 1.0, 250, 0.0, 3.0))
    assert torch.equal(greedy, logits.argmax(-1, keepdim=True))


def test_extension_windows(tmp_path):
    # 19.5 s from a 19 s model: audiocraft's second window starts from a prompt of past tokens,
    # which the prefill takes.
    directory = str(write_checkpoint(tmp_path, "tiny", max_duration_seconds=19.0))
    reference = StemEngine(directory, device="cpu", mode="eager").generate(PROMPTS[:2], 19.5, seed=2)
    for mode in ("exact", "static"):
        assert np.array_equal(
            reference, StemEngine(directory, device="cpu", mode=mode).generate(PROMPTS[:2], 19.5, seed=2))


def test_continuation(eager, exact, static):
    # the prompt audio's tokens go through the prefill
    audio = np.sin(np.linspace(0, 600, 32000, dtype=np.float32))[None] * 0.3
    cond = AudioConditioning("continuation", audio, 32000, "sine")
    a = eager.generate(PROMPTS[:2], 1.0, seed=2, conditioning=cond)
    assert np.array_equal(a, exact.generate(PROMPTS[:2], 1.0, seed=2, conditioning=cond))
    assert np.array_equal(a, static.generate(PROMPTS[:2], 1.0, seed=2, conditioning=cond))


def test_melody_model_prepends_the_chromagram():
    # also: a seeded melody clip repeats across model loads (demucs' random shift is seeded)
    eager = StemEngine("tiny-melody", device="cpu", mode="eager")
    static = StemEngine("tiny-melody", device="cpu", mode="static")
    exact = StemEngine("tiny-melody", device="cpu", mode="exact")
    assert static.decoder.unsupported is None
    rate = 32000
    t = np.arange(rate * 2) / rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
    cond = AudioConditioning("chroma", audio, rate, "a3")
    a = eager.generate(PROMPTS[:2], 1.0, seed=8, conditioning=cond)
    assert np.array_equal(a, static.generate(PROMPTS[:2], 1.0, seed=8, conditioning=cond))
    assert np.array_equal(a, exact.generate(PROMPTS[:2], 1.0, seed=8, conditioning=cond))
    assert static.decoder.stats.fallbacks == 0


def test_beyond_the_static_capacity_falls_back_to_eager(eager, checkpoint):
    short = StemEngine(checkpoint, device="cpu", mode="static", capacity_seconds=0.5)
    assert short.decoder.capacity == 256  # rounded up to whole attention chunks
    a = short.generate(PROMPTS[:1], 6.0, seed=6)  # 300 steps
    assert short.decoder.stats.fallbacks == 1 and "capacity" in short.decoder.stats.last_fallback
    assert np.array_equal(a, eager.generate(PROMPTS[:1], 6.0, seed=6))


def test_batches_above_the_largest_bucket_fall_back(eager, checkpoint):
    small = StemEngine(checkpoint, device="cpu", mode="static", buckets=(1, 2))
    a = small.generate(PROMPTS, 0.5, seed=1)
    assert small.decoder.stats.fallbacks == 1 and "bucket" in small.decoder.stats.last_fallback
    assert np.array_equal(a, eager.generate(PROMPTS, 0.5, seed=1))


def test_unsupported_architectures_are_named(checkpoint):
    lm = StemEngine(checkpoint, device="cpu", mode="eager")._model.lm
    assert unsupported_reason(lm) is None
    lm.two_step_cfg = True
    assert "two-step" in unsupported_reason(lm)
    lm.two_step_cfg = False
    lm.transformer.positional_embedding = "rope"
    assert "positional" in unsupported_reason(lm)


def test_bucket_for():
    assert [bucket_for(n, DEFAULT_BUCKETS) for n in (1, 2, 3, 5, 33, 64, 65)] == [1, 2, 4, 8, 64, 64, None]


def test_modes_and_precision_resolve(checkpoint):
    engine = StemEngine(checkpoint, device="cpu")
    assert (engine.mode, engine.precision, engine.decoder) == ("eager", "float32", None)
    with pytest.raises(ValueError, match="CUDA"):
        StemEngine(checkpoint, device="cpu", mode="graph")
    with pytest.raises(ValueError, match="mode"):
        StemEngine(checkpoint, device="cpu", mode="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_matches_the_uncaptured_static_step(checkpoint):
    graph = StemEngine(checkpoint, device="cuda", mode="graph", buckets=(1, 2, 4))
    static = StemEngine(checkpoint, device="cuda", mode="static", buckets=(1, 2, 4),
                        precision=graph.precision)
    assert graph.warm_up(batch_size=4) > 0 and graph.decoder.stats.graphs > 0
    a = graph.generate(PROMPTS, 2.0, seed=13)
    assert np.array_equal(a, graph.generate(PROMPTS, 2.0, seed=13))  # a seeded request repeats
    b = static.generate(PROMPTS, 2.0, seed=13)
    agreement = float(np.mean(np.isclose(a, b, atol=1e-3)))
    assert agreement > 0.9, agreement
    assert graph.decoder.stats.graph_steps > 0 and graph.decoder.stats.fallbacks == 0
