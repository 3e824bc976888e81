"""The precision layout of MusicGen's language model, one definition for CUDA and CPU.

audiocraft on CUDA (``audiocraft.models.loaders.load_lm_model``) builds the transformer layers in
float16 (``cfg.dtype``), keeps the token embeddings, the output norm and the output linears in
float32, and runs the whole generation under ``torch.autocast(float16)``
(``audiocraft.models.genmodel.BaseGenModel.autocast``). The residual stream and the sinusoidal
positions are therefore float32, and every matmul runs in float16. ``ENGINE_PRECISION`` picks:

- ``float32``: everything float32, autocast off (audiocraft's CPU path);
- ``float16`` / ``bfloat16``: audiocraft's CUDA layout in that half type: the layers' linear
  weights (attention projections, feed-forward, layer scales) in the half type, everything else
  float32, the generation under autocast to the half type. The layers' norms are held in float32:
  CUDA's autocast runs ``layer_norm`` in float32 anyway (weights cast up exactly), and CPU's
  autocast does not, so float32 norms give the same arithmetic on CUDA and a working one on CPU.
  On a CPU whose oneDNN multiplies bfloat16, the bfloat16 linear weights are held packed in
  oneDNN's layout (``stems.cpu_weights.PackedWeight``): the same products, bit for bit, without
  the per-call reorder. On CPU the attention itself runs in float32 over float32 keys/values
  (``float32_attention``);
- ``int8`` (CPU): the ``bfloat16`` layout with the layers' linear weights (``in_proj_weight``
  included) held as int8 with one float scale per output channel, multiplied by
  ``torch._weight_int8pack_mm`` (weight-only: activations stay bfloat16;
  ``stems.cpu_weights.Int8Weight``).

The conditioners and EnCodec stay float32 in every layout. ``auto`` is float16 on CUDA
(audiocraft's own) and, on CPU, bfloat16 where the CPU has native bfloat16 arithmetic
(AVX512-BF16 or AMX), float32 elsewhere (figures: docs/benchmarks.md#precision).
"""

from __future__ import annotations

import functools
from pathlib import Path

PRECISIONS = ("auto", "float32", "float16", "bfloat16", "int8")
ENGINE_MODES = ("auto", "eager", "exact", "static", "graph")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16``
    flag of /proc/cpuinfo; False where that file is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str) -> str:
    """ENGINE_PRECISION "auto": float16 on CUDA (audiocraft's layout), bfloat16 on a CPU with
    native bfloat16, else float32. Other values pass through.

    Raises:
        ValueError: for an unknown value.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"ENGINE_PRECISION must be one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"


def resolve_mode(mode: str, device: str) -> str:
    """ENGINE_MODE "auto": CUDA-graph decoding on CUDA, audiocraft's eager generate on CPU
    (docs/benchmarks.md#decoding). Other values pass through.

    Raises:
        ValueError: for an unknown value.
    """
    if mode not in ENGINE_MODES:
        raise ValueError(f"ENGINE_MODE must be one of {ENGINE_MODES}")
    if mode == "auto":
        return "graph" if device.startswith("cuda") else "eager"
    return mode


def conflict(mode: str, precision: str, device: str, attention_backend: str = "torch") -> str | None:
    """Why this combination of ENGINE_MODE, ENGINE_PRECISION, STEMGEN_DEVICE and
    ATTENTION_BACKEND cannot run (None: it can). ``device`` "auto" checks only what holds on
    every device; the engine checks again once the device is known."""
    if mode not in ENGINE_MODES:
        return f"ENGINE_MODE={mode!r}: must be one of {ENGINE_MODES}"
    if precision not in PRECISIONS:
        return f"ENGINE_PRECISION={precision!r}: must be one of {PRECISIONS}"
    cuda, cpu = device.startswith("cuda"), device == "cpu"
    if mode == "graph" and cpu:
        return "ENGINE_MODE=graph needs a CUDA device (STEMGEN_DEVICE=cpu)"
    if precision == "int8" and cuda:
        return ("ENGINE_PRECISION=int8 is for CPU workers (its kernel, torch._weight_int8pack_mm, "
                "is not what a GPU should run); use float16 or bfloat16 with STEMGEN_DEVICE=cuda")
    if precision == "int8" and mode == "graph":
        return "ENGINE_PRECISION=int8 is for CPU workers; ENGINE_MODE=graph is CUDA only"
    if attention_backend == "xformers" and cpu:
        return "ATTENTION_BACKEND=xformers needs a CUDA device (STEMGEN_DEVICE=cpu)"
    if attention_backend == "xformers" and mode != "eager":
        return (f"ATTENTION_BACKEND=xformers works with ENGINE_MODE=eager only (ENGINE_MODE={mode}): "
                "the static step attends with torch's scaled_dot_product_attention over "
                "[batch, heads, time, head_dim] keys, xformers keeps [batch, time, heads, head_dim]")
    return None


#: What the transformer layers' linear weights are held in, and what autocast computes in.
_LAYOUTS = {"float32": ("float32", None), "float16": ("float16", "float16"),
            "bfloat16": ("bfloat16", "bfloat16"), "int8": ("int8", "bfloat16")}


def compute_dtype(precision: str):
    """The torch dtype matmuls run in under ``precision`` (None: float32, autocast off)."""
    import torch

    name = _LAYOUTS[precision][1]
    return None if name is None else getattr(torch, name)


def autocast(precision: str, device_type: str, cache_enabled: bool = True):
    """The autocast context of ``precision`` (disabled for float32); ``cache_enabled=False``
    for CUDA-graph capture (a cached weight cast would not outlive the context)."""
    import torch

    dtype = compute_dtype(precision)
    return torch.autocast(device_type=device_type, dtype=dtype or torch.float32,
                          enabled=dtype is not None, cache_enabled=cache_enabled)


def float32_attention(precision: str, device: str) -> bool:
    """Whether the attention runs in float32 over float32 keys/values
    (``stems.audiocraft_patches.attend``): on CPU in a half-precision layout, where PyTorch's
    bfloat16 flash-attention kernel is several times slower than float32 for one-query steps.
    On CUDA the layout's attention is audiocraft's own."""
    return device == "cpu" and compute_dtype(precision) is not None


def apply_layout(model, precision: str) -> None:
    """Put a loaded audiocraft ``MusicGen`` in ``precision``'s layout (module doc) and set its
    ``autocast`` to match. Works from any loaded state (CPU float32, CUDA's float16 layers):
    float16 values go to float32 and back exactly.

    Raises:
        ValueError: for "auto" or an unknown precision.
    """
    import torch
    from audiocraft.utils.autocast import TorchAutocast

    from stems.cpu_weights import can_pack, hold_layer_weights

    if precision not in _LAYOUTS:
        raise ValueError(f"precision must be one of {tuple(_LAYOUTS)} (resolve 'auto' first)")
    lm = model.lm
    device = next(iter(lm.parameters())).device
    lm.float()
    half = compute_dtype(precision)
    if half is None:
        model.autocast = TorchAutocast(enabled=False)
        return
    for layer in lm.transformer.layers:
        layer.to(half)
        for module in layer.modules():
            if isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__:
                module.float()
        if precision == "int8":
            hold_layer_weights(layer, "int8")
        elif device.type == "cpu" and can_pack(half):
            hold_layer_weights(layer, "packed")
    model.autocast = TorchAutocast(enabled=True, device_type=device.type, dtype=half)


def layout_of(lm) -> str:
    """The precision a language model is laid out in (read from its first layer)."""
    import torch

    from stems.cpu_weights import Int8Weight

    weight = lm.transformer.layers[0].linear1.weight
    if isinstance(weight, Int8Weight):
        return "int8"
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(weight.dtype, "float32")
