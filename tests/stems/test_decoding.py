"""Static decoding (stems.decoding) against audiocraft's eager generate, on the same CPU.

"exact" must give bitwise the clips of eager; "static" (bucket padding, masked attention over a
fixed length: the step a CUDA graph captures) gives the same tokens on this CPU too, because its
random draws are made for the real rows only. The CUDA-graph capture itself runs only where CUDA
is present (last test).
"""

import functools

import numpy as np
import pytest
import torch

from stems.checkpoint import write_checkpoint
from stems.decoding import (DEFAULT_BUCKETS, TOLERANCE, StaticDecoder, bucket_for, compare,
                            teacher_forced, unsupported_reason)
from stems.engine import AudioConditioning, SamplingParams, StemEngine
from stems.sampling import SamplingTensors, sample_next

PROMPTS = ["guitar riff", "bass line", "drum groove"]
#: float32 unless a test names its precision: the bitwise tests against eager hold at any precision
#: for exact, and for static only in float32 (padding changes a half-precision matmul's shapes)
engine_at = functools.partial(StemEngine, precision="float32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=4))


@pytest.fixture(scope="module")
def eager(checkpoint):
    return engine_at(checkpoint, device="cpu", mode="eager")


@pytest.fixture(scope="module")
def exact(checkpoint):
    return engine_at(checkpoint, device="cpu", mode="exact")


@pytest.fixture(scope="module")
def static(checkpoint):
    return engine_at(checkpoint, device="cpu", mode="static", buckets=(1, 2, 4, 8))


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
    lm = engine_at(checkpoint, device="cpu", mode="eager")._model.lm
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
    # the settings are tensors (what a captured step reads); each branch is audiocraft's
    from audiocraft.utils import utils

    logits = torch.randn(3, 4, 300)
    settings = SamplingTensors("cpu")
    for params, reference in (
            (SamplingParams(top_k=50), lambda p: utils.sample_top_k(p, 50)),
            (SamplingParams(top_k=0, top_p=0.8), lambda p: utils.sample_top_p(p, 0.8)),
            (SamplingParams(top_k=0), lambda p: utils.multinomial(p, 1))):
        settings.write(params, 300)
        torch.manual_seed(9)
        expected = reference(torch.softmax(logits, dim=-1))
        torch.manual_seed(9)
        noise = torch.empty_like(logits).exponential_(1)
        assert torch.equal(sample_next(logits, settings, noise), expected)
    settings.write(SamplingParams(use_sampling=False), 300)
    greedy = sample_next(logits, settings, torch.ones_like(logits))
    assert torch.equal(greedy, logits.argmax(-1, keepdim=True))


def test_extension_windows(tmp_path):
    # 19.5 s from a 19 s model: audiocraft's second window starts from a prompt of past tokens,
    # which the prefill takes.
    directory = str(write_checkpoint(tmp_path, "tiny", max_duration_seconds=19.0))
    reference = engine_at(directory, device="cpu", mode="eager").generate(PROMPTS[:2], 19.5, seed=2)
    for mode in ("exact", "static"):
        assert np.array_equal(
            reference, engine_at(directory, device="cpu", mode=mode).generate(PROMPTS[:2], 19.5, seed=2))


def test_continuation(eager, exact, static):
    # the prompt audio's tokens go through the prefill
    audio = np.sin(np.linspace(0, 600, 32000, dtype=np.float32))[None] * 0.3
    cond = AudioConditioning("continuation", audio, 32000, "sine")
    a = eager.generate(PROMPTS[:2], 1.0, seed=2, conditioning=cond)
    assert np.array_equal(a, exact.generate(PROMPTS[:2], 1.0, seed=2, conditioning=cond))
    assert np.array_equal(a, static.generate(PROMPTS[:2], 1.0, seed=2, conditioning=cond))


def test_melody_model_prepends_the_chromagram():
    # also: a seeded melody clip repeats across model loads (demucs' random shift is seeded)
    eager = engine_at("tiny-melody", device="cpu", mode="eager")
    static = engine_at("tiny-melody", device="cpu", mode="static")
    exact = engine_at("tiny-melody", device="cpu", mode="exact")
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
    short = engine_at(checkpoint, device="cpu", mode="static", capacity_seconds=0.5)
    assert short.decoder.capacity == 256  # rounded up to whole attention chunks
    a = short.generate(PROMPTS[:1], 6.0, seed=6)  # 300 steps
    assert short.decoder.stats.fallbacks == 1 and "capacity" in short.decoder.stats.last_fallback
    assert np.array_equal(a, eager.generate(PROMPTS[:1], 6.0, seed=6))


def test_batches_above_the_largest_bucket_fall_back(eager, checkpoint):
    small = engine_at(checkpoint, device="cpu", mode="static", buckets=(1, 2))
    a = small.generate(PROMPTS, 0.5, seed=1)
    assert small.decoder.stats.fallbacks == 1 and "bucket" in small.decoder.stats.last_fallback
    assert np.array_equal(a, eager.generate(PROMPTS, 0.5, seed=1))


def test_unsupported_architectures_are_named(checkpoint):
    lm = engine_at(checkpoint, device="cpu", mode="eager")._model.lm
    assert unsupported_reason(lm) is None
    lm.two_step_cfg = True
    assert "two-step" in unsupported_reason(lm)
    lm.two_step_cfg = False
    lm.transformer.positional_embedding = "rope"
    assert "positional" in unsupported_reason(lm)


def test_bucket_for():
    assert [bucket_for(n, DEFAULT_BUCKETS) for n in (1, 2, 3, 5, 33, 64, 65)] == [1, 2, 4, 8, 64, 64, None]


def test_modes_and_precision_resolve(checkpoint):
    engine = engine_at(checkpoint, device="cpu", precision="float32")
    assert (engine.mode, engine.precision, engine.decoder) == ("eager", "float32", None)
    with pytest.raises(ValueError, match="CUDA"):
        engine_at(checkpoint, device="cpu", mode="graph")
    with pytest.raises(ValueError, match="ENGINE_MODE"):
        engine_at(checkpoint, device="cpu", mode="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_is_bitwise_the_uncaptured_static_step(checkpoint):
    # replay and the uncaptured step run the same kernels on the same inputs: bit for bit
    graph = engine_at(checkpoint, device="cuda", mode="graph", buckets=(1, 2, 4))
    assert graph.warm_up(batch_size=4) > 0 and graph.decoder.stats.graphs > 0
    graphs = graph.decoder.stats.graphs
    a = graph.generate(PROMPTS, 2.0, seed=13)
    assert np.array_equal(a, graph.generate(PROMPTS, 2.0, seed=13))  # a seeded request repeats
    graph.decoder.graphs = False  # the same decoder, buffers and weights, uncaptured
    b = graph.generate(PROMPTS, 2.0, seed=13)
    graph.decoder.graphs = True
    assert np.array_equal(a, b)
    # other sampling settings replay the same graphs: none is added
    graph.generate(PROMPTS, 1.0, seed=1, sampling=SamplingParams(top_k=7, temperature=0.6, cfg_coef=1.1))
    assert graph.decoder.stats.graphs == graphs and graph.decoder.stats.uncaptured_steps == 0
    assert graph.self_check()["passed"]


# --- precision layouts (stems.precision) -----------------------------------------------------------

@pytest.mark.parametrize("precision", ["float16", "bfloat16", "int8"])
def test_exact_is_bitwise_eager_at_each_precision(checkpoint, precision):
    # the same casts as audiocraft's generate under the layout's autocast: bit for bit
    eager = engine_at(checkpoint, device="cpu", mode="eager", precision=precision)
    exact = engine_at(checkpoint, device="cpu", mode="exact", precision=precision)
    for sampling in (SamplingParams(), SamplingParams(top_p=0.9, top_k=0),
                     SamplingParams(top_k=20, temperature=0.7, cfg_coef=1.5)):
        a = eager.generate(PROMPTS, 1.0, seed=3, sampling=sampling)
        assert np.array_equal(a, exact.generate(PROMPTS, 1.0, seed=3, sampling=sampling))
    assert exact.decoder.stats.fallbacks == 0


def test_the_cuda_layout_on_cpu(checkpoint):
    # audiocraft's CUDA layout (float16 layers; float32 embeddings, norms, output linears,
    # positions and residual stream), built on CPU: the static step against audiocraft's eager
    # forward on the same layout, within the stated tolerance
    engine = engine_at(checkpoint, device="cpu", mode="static", precision="float16", buckets=(4,))
    lm = engine._model.lm
    layer = lm.transformer.layers[0]
    assert layer.self_attn.in_proj_weight.dtype == layer.linear1.weight.dtype == torch.float16
    assert layer.norm1.weight.dtype == lm.emb[0].weight.dtype == lm.linears[0].weight.dtype == torch.float32
    assert lm.out_norm.weight.dtype == torch.float32
    residual = []
    hook = layer.norm1.register_forward_hook(lambda m, args, out: residual.append(args[0].dtype))
    engine.decoder.recorded = []
    engine.generate(PROMPTS, 2.0, seed=5)
    hook.remove()
    assert set(residual) == {torch.float32}  # the residual stream (with the positions) stays float32
    static, eager = teacher_forced(engine.decoder)
    figures = compare(static, eager)
    assert figures["relative_error"] <= TOLERANCE["float16"], figures
    assert figures["token_agreement"] >= 0.99, figures


def test_capture_shaped_steps_take_sampling_as_data(checkpoint):
    # a graph mode decoder's replay path, driven on CPU with each graph's body in place of a
    # CUDA graph: one body per (bucket, attended length) serves every request's sampling settings
    eager = engine_at(checkpoint, device="cpu", mode="eager")
    engine = engine_at(checkpoint, device="cpu", mode="static", buckets=(2, 4))
    decoder = engine.decoder
    decoder.graphs = True
    bodies = {(b, kv): decoder.graph_body(b, kv) for b in (2, 4)
              for kv in range(decoder.kv_chunk, decoder.capacity + 1, decoder.kv_chunk)}

    class Body:
        def __init__(self, step):
            self.replay = step

    decoder._graphs = {key: Body(step) for key, step in bodies.items()}
    for sampling in (SamplingParams(), SamplingParams(top_k=7, temperature=0.6, cfg_coef=1.1),
                     SamplingParams(top_p=0.8, top_k=0), SamplingParams(temperature=0.0)):
        assert np.array_equal(eager.generate(PROMPTS, 1.0, seed=4, sampling=sampling),
                              engine.generate(PROMPTS, 1.0, seed=4, sampling=sampling))
    assert len(decoder._graphs) == len(bodies) and decoder.stats.uncaptured_steps == 0
    assert decoder.stats.graph_steps > 0


def test_self_check_turns_the_decoder_off_on_a_mismatch(checkpoint, monkeypatch):
    from stems import decoding

    engine = engine_at(checkpoint, device="cpu", mode="static", buckets=(2,))
    assert engine.self_check()["passed"]
    # a step whose guidance is off: its logits leave the eager forward's
    monkeypatch.setattr(decoding, "guide", lambda cond, uncond, coef: uncond + (cond - uncond) * 2 * coef)
    result = engine.self_check()
    assert not result["passed"] and "tolerance" in result["reason"]
    assert engine.decoder.unsupported.startswith("self-check failed")
    engine.generate(PROMPTS[:1], 0.5, seed=1)
    assert engine.decoder.stats.fallbacks == 1


@pytest.mark.parametrize("mode,precision,device,backend,variable", [
    ("graph", "auto", "cpu", "torch", "ENGINE_MODE=graph"),
    ("static", "int8", "cuda", "torch", "ENGINE_PRECISION=int8"),
    ("exact", "auto", "cuda", "xformers", "ATTENTION_BACKEND=xformers"),
    ("eager", "auto", "cpu", "xformers", "ATTENTION_BACKEND=xformers"),
    ("fast", "auto", "cpu", "torch", "ENGINE_MODE"),
])
def test_refused_combinations_name_the_variable(mode, precision, device, backend, variable):
    from stems.precision import conflict

    assert variable in conflict(mode, precision, device, backend)


def test_every_cuda_combination_is_allowed_or_refused():
    from stems.precision import ENGINE_MODES, PRECISIONS, conflict

    allowed = {(m, p) for m in ENGINE_MODES for p in PRECISIONS if conflict(m, p, "cuda") is None}
    assert ("graph", "float16") in allowed and ("eager", "float32") in allowed
    assert not any(p == "int8" for _, p in allowed)


def test_cpu_half_layouts_attend_in_float32(checkpoint):
    # on CPU a half layout attends in float32 over float32 keys/values (PyTorch's bfloat16 CPU
    # flash attention is slow for one-query steps); float32 and CUDA layouts keep torch's own
    from stems.audiocraft_patches import attend
    from stems.precision import float32_attention

    assert float32_attention("bfloat16", "cpu") and float32_attention("int8", "cpu")
    assert not float32_attention("float32", "cpu") and not float32_attention("float16", "cuda")
    exact = engine_at(checkpoint, device="cpu", mode="exact", precision="bfloat16")
    assert exact.settings["float32_attention"] and exact.decoder.dtype == torch.float32
    held = []
    attention = exact._model.lm.transformer.layers[0].self_attn
    hook = attention.register_forward_hook(
        lambda module, args, out: held.append(module._streaming_state["past_keys"].dtype))
    exact.generate(PROMPTS[:1], 0.5, seed=1)  # the prefill runs audiocraft's (patched) forward
    hook.remove()
    assert held == [torch.float32]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=gen).bfloat16() for n in (1, 9, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, float32=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())
    assert not engine_at(checkpoint, device="cpu", mode="eager").settings["float32_attention"]
