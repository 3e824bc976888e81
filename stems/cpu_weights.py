"""Linear weights held for CPU kernels: int8 weight-only and oneDNN-packed bfloat16.

Both stand in where audiocraft 1.3.0 reads a transformer layer's linear weight:
``F.linear(x, w, b)`` (``nn.Linear.forward``, and ``StreamingMultiheadAttention``'s
``in_proj_weight`` for self-attention), ``w[a:b]`` (the cross-attention's query/key/value rows,
sliced at every step), ``w.shape``/``w.dtype``. ``F.linear`` reaches them through
``__torch_function__``, ahead of autocast, so they cast the activations themselves, to the dtype
autocast would have given them.

- ``Int8Weight``: int8 ``[out, in]`` with one scale per output channel, multiplied by
  ``torch._weight_int8pack_mm`` (the kernel torchao's int8 weight-only layout calls on CPU).
- ``PackedWeight``: a bfloat16 weight reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied by
  ``torch.ops.mkldnn._linear_pointwise``: the pair Inductor's CPU weight-prepacking pass
  (``torch/_inductor/fx_passes/mkldnn_fusion.py``) emits. ``F.linear`` on a plain bfloat16
  weight runs the same oneDNN matmul but reorders the weight at every call; packed, a
  batch-1 decoding step's matmuls take about two thirds of the time, and the products are
  bitwise the same (``tests/stems/test_cpu_weights.py``).

Row slices (``w[a:b]``) are made once and kept, so a cross-attention's per-step query slice
costs nothing; a cross-attention's ``in_proj_weight`` is held as its three row ranges only
(``RowSlices``).
"""

from __future__ import annotations

__all__ = ["Int8Weight", "PackedWeight", "RowSlices", "can_pack", "hold_layer_weights"]


def can_pack(dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's packed matmul for ``dtype`` (bfloat16 only:
    float16 needs AVX-NE-CONVERT or AVX512-FP16)."""
    import torch

    if dtype is not torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _HeldWeight:
    """What both held weights share: the ``F.linear`` hook and the kept row slices."""

    shape: tuple
    dtype: object
    device: object

    def __init__(self):
        self._rows: dict[tuple[int, int], _HeldWeight] = {}

    def linear(self, x, bias=None):  # pragma: no cover - the subclasses define it
        raise NotImplementedError

    def _slice(self, start: int, stop: int) -> "_HeldWeight":
        raise TypeError(f"rows {start}:{stop} of this {type(self).__name__} were not kept")

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a held linear weight is sliced by a contiguous range of output rows only")
        start, stop, _ = rows.indices(self.shape[0])
        if (start, stop) == (0, self.shape[0]):
            return self
        if (start, stop) not in self._rows:
            self._rows[start, stop] = self._slice(start, stop)
        return self._rows[start, stop]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return weight.linear(x, bias)
        raise TypeError(f"{func} is not defined for a {cls.__name__}")


class Int8Weight(_HeldWeight):
    """A linear weight ``[out, in]`` held as int8 with one scale per output channel; the product
    is ``torch._weight_int8pack_mm``: the activations are cast to the scales' dtype (bfloat16)
    and the output comes back in it.

    Quantization is symmetric per output channel by ``torch.ao.quantization``'s
    ``PerChannelMinMaxObserver`` and ``torch.quantize_per_channel``.
    """

    def __init__(self, data, scales):
        super().__init__()
        self.data = data  # int8 [out, in], contiguous
        self.scales = scales  # [out], the compute dtype
        self.shape = data.shape
        self.dtype = data.dtype
        self.device = data.device

    @classmethod
    def quantize(cls, weight, compute=None) -> "Int8Weight":
        import torch
        from torch.ao.quantization.observer import PerChannelMinMaxObserver

        compute = compute or torch.bfloat16
        w = weight.detach().float()
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                            qscheme=torch.per_channel_symmetric)
        observer(w)
        scales, zero_points = observer.calculate_qparams()
        q = torch.quantize_per_channel(w, scales.float(), zero_points, 0, torch.qint8)
        return cls(q.int_repr().contiguous(), scales.to(compute))

    def _slice(self, start: int, stop: int) -> "Int8Weight":
        return Int8Weight(self.data[start:stop].contiguous(), self.scales[start:stop].contiguous())

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scales.numel() * self.scales.element_size()

    def linear(self, x, bias=None):
        import torch

        shape = x.shape
        out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype).contiguous(),
                                        self.data, self.scales)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.view(*shape[:-1], self.shape[0])


class PackedWeight(_HeldWeight):
    """A bfloat16 linear weight ``[out, in]`` in oneDNN's blocked layout (module doc).

    ``linear(x)`` casts ``x`` ``[..., in]`` to bfloat16 (as CPU autocast casts a linear's
    input) and returns ``[..., out]`` bfloat16.
    """

    #: rows a packed weight is laid out for: a batch-1 decoding step with guidance
    BATCH_HINT = 2

    def __init__(self, weight):
        import torch

        super().__init__()
        self.shape = tuple(weight.shape)
        self.dtype = torch.bfloat16
        self.device = weight.device
        dense = weight.detach().to(torch.bfloat16).contiguous()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(dense, self.BATCH_HINT)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 2

    def linear(self, x, bias=None):
        import torch

        if bias is not None:
            bias = bias.to(self.dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self._packed, bias, "none", [], "")


class RowSlices(_HeldWeight):
    """A weight ``[out, in]`` that is only ever read by row ranges (a cross-attention's
    ``in_proj_weight``: ``w[:dim]``, ``w[dim:2 * dim]``, ``w[2 * dim:]``), held as one held weight
    per range and never whole."""

    def __init__(self, shape, parts: dict):
        super().__init__()
        first = next(iter(parts.values()))
        self.shape, self.dtype, self.device = tuple(shape), first.dtype, first.device
        self._rows.update(parts)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._rows.values())

    def linear(self, x, bias=None):
        raise TypeError("this weight is held as row ranges only (a cross-attention's query/key/value)")


def hold_layer_weights(layer, kind: str) -> int:
    """Replace the linear weights of one transformer layer (every ``nn.Linear`` and the attention
    modules' ``in_proj_weight``) by held weights: ``kind`` "int8" (``Int8Weight``) or "packed"
    (``PackedWeight``); a cross-attention's ``in_proj_weight`` as its query, key and value rows
    (``RowSlices``). Biases stay where they are. Returns how many weights were replaced.

    Raises:
        ValueError: for another ``kind``.
    """
    import torch

    if kind not in ("int8", "packed"):
        raise ValueError(f"kind must be 'int8' or 'packed', not {kind!r}")
    count = 0
    for module in layer.modules():
        linear = isinstance(module, torch.nn.Linear)
        if not linear and not (hasattr(module, "in_proj_weight")
                               and isinstance(module.in_proj_weight, torch.nn.Parameter)):
            continue
        name = "weight" if linear else "in_proj_weight"
        weight = getattr(module, name)
        make = Int8Weight.quantize if kind == "int8" else PackedWeight
        if not linear and getattr(module, "cross_attention", False):
            dim = weight.shape[0] // 3  # per-channel int8 scales: the same as slicing the whole
            held = RowSlices(weight.shape, {(i * dim, (i + 1) * dim): make(weight[i * dim:(i + 1) * dim])
                                            for i in range(3)})
        else:
            held = make(weight)
        delattr(module, name)
        object.__setattr__(module, name, held)
        count += 1
    return count
