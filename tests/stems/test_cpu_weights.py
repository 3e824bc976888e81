"""Linear weights held for CPU kernels (stems.cpu_weights): oneDNN-packed bfloat16 and int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stems import cpu_weights
from stems.checkpoint import write_checkpoint
from stems.cpu_weights import Int8Weight, PackedWeight, RowSlices, can_pack, hold_layer_weights
from stems.engine import StemEngine

needs_packing = pytest.mark.skipif(not can_pack(torch.bfloat16),
                                   reason="this CPU's oneDNN has no bfloat16 matmul")
PROMPTS = ["guitar riff", "bass line"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=2))


@needs_packing
@pytest.mark.parametrize("rows", [1, 2, 6, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_weight_gives_the_dense_products_bit_for_bit(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(384, 256, generator=gen)
    b = torch.randn(384, generator=gen).bfloat16() if bias else None
    x = torch.randn(rows, 1, 256, generator=gen)  # float32, as the norms hand it over
    dense = F.linear(x.bfloat16(), weight.bfloat16(), b)
    packed = F.linear(x, PackedWeight(weight), b)
    assert packed.dtype == torch.bfloat16 and packed.shape == (rows, 1, 384)
    assert torch.equal(packed, dense)


@needs_packing
def test_a_bfloat16_engine_holds_packed_layers_and_decodes_the_same_tokens(checkpoint, monkeypatch):
    packed = StemEngine(checkpoint, device="cpu", mode="eager", precision="bfloat16")
    layer = packed._model.lm.transformer.layers[0]
    assert isinstance(layer.linear1.weight, PackedWeight)
    assert isinstance(layer.self_attn.in_proj_weight, PackedWeight)
    assert isinstance(layer.cross_attention.in_proj_weight, RowSlices)
    assert layer.norm1.weight.dtype == torch.float32
    monkeypatch.setattr(cpu_weights, "can_pack", lambda dtype: False)
    dense = StemEngine(checkpoint, device="cpu", mode="eager", precision="bfloat16")
    assert dense._model.lm.transformer.layers[0].linear1.weight.dtype == torch.bfloat16
    assert np.array_equal(packed.generate(PROMPTS, 1.0, seed=7), dense.generate(PROMPTS, 1.0, seed=7))


def test_int8_row_ranges_equal_the_slices_of_the_whole_quantization():
    weight = torch.randn(96, 32, generator=torch.Generator().manual_seed(3))
    whole = Int8Weight.quantize(weight)
    part = whole[32:64]
    alone = Int8Weight.quantize(weight[32:64])
    assert torch.equal(part.data, alone.data) and torch.equal(part.scales, alone.scales)
    assert whole[32:64] is part  # kept: a per-step slice costs nothing
    assert whole[:] is whole


def test_row_slices_refuse_what_they_do_not_hold():
    held = RowSlices((6, 4), {(0, 3): Int8Weight.quantize(torch.ones(3, 4)),
                              (3, 6): Int8Weight.quantize(torch.ones(3, 4))})
    assert held[3:6].shape == (3, 4)
    with pytest.raises(TypeError, match="not kept"):
        held[1:4]
    with pytest.raises(TypeError, match="row ranges only"):
        F.linear(torch.ones(1, 4), held)
    with pytest.raises(TypeError, match="contiguous range"):
        held[::2]


def test_hold_layer_weights_names_the_kinds():
    with pytest.raises(ValueError, match="int8"):
        hold_layer_weights(torch.nn.Linear(2, 2), "float8")
    layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    assert hold_layer_weights(layer, "int8") == 2
    assert isinstance(layer[0].weight, Int8Weight)
