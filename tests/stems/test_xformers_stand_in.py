"""stems.xformers_stand_in: audiocraft imports without loading an xformers extension built for
another torch, and its attention computes what it computed with the real xformers' Python parts."""

import subprocess
import sys

import pytest
import torch

import stems  # noqa: F401  (installs the stand-in where it applies)
from stems import xformers_stand_in
from tests.harness import ROOT

pytestmark = pytest.mark.skipif(xformers_stand_in.extension_loads() is True,
                                reason="an xformers build that loads on this torch is installed")


def test_the_installed_xformers_extension_does_not_match_torch_so_the_stand_in_is_used():
    assert xformers_stand_in.active()
    from audiocraft.modules import transformer

    assert transformer.ops is sys.modules["xformers.ops"]
    assert getattr(transformer.ops, xformers_stand_in.MARKER)


def test_memory_efficient_causal_attention_matches_the_plain_path():
    """audiocraft's memory-efficient layout (ops.unbind, LowerTriangularMask as the causal flag)
    against its plain path (an explicit causal mask) with the same weights."""
    from audiocraft.modules.transformer import StreamingMultiheadAttention

    torch.manual_seed(0)
    efficient = StreamingMultiheadAttention(32, 4, causal=True, memory_efficient=True)
    plain = StreamingMultiheadAttention(32, 4, causal=True, memory_efficient=False)
    plain.load_state_dict(efficient.state_dict())
    x = torch.randn(2, 7, 32)
    with torch.inference_mode():
        a = efficient(x, x, x)[0]
        b = plain(x, x, x)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # causal: the first step does not see the later ones
    y = x.clone()
    y[:, 3:] = torch.randn(2, 4, 32)
    with torch.inference_mode():
        c = efficient(y, y, y)[0]
    torch.testing.assert_close(a[:, :3], c[:, :3], atol=1e-5, rtol=1e-5)


def test_xformers_attention_backend_is_refused_with_the_reason():
    from stems.engine import StemEngine

    with pytest.raises(ValueError, match="xformers build whose extension loads"):
        StemEngine("tiny", "cpu", attention_backend="xformers")


def test_importing_audiocraft_through_stems_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import stems.engine, audiocraft.models, "
                             "audiocraft.modules.transformer"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
