"""The changes stemgen makes to audiocraft 1.3.0's attention modules, all in this module.

Each is installed per module instance (``install_streaming_caches``; the classes and other
models are untouched), changes no value computed, and names the upstream lines of
``audiocraft/modules/transformer.py`` (``StreamingMultiheadAttention``) it stands in for:

- ``_buffered_complete_kv`` replaces ``_complete_kv``'s
  ``nk = torch.cat([pk, k], dim=time_dim)`` / ``nv = torch.cat([pv, v], dim=time_dim)``
  (a copy of the whole past at every step) with an append into a buffer with spare capacity;
- ``_cached_cross_attention`` replaces ``forward``'s
  ``k = nn.functional.linear(key, self.in_proj_weight[dim: 2 * dim], bias_k)`` /
  ``v = nn.functional.linear(value, self.in_proj_weight[2 * dim:], bias_v)`` (the conditioning
  projected again at every step) with a projection kept for the streaming session.

``project_cross`` is the one cross-attention projection: the patched forward and the static
decoder (stems.decoding) both call it.

One change does alter values, on request (``install_streaming_caches(float32_attention=True)``,
which the engine asks for on CPU in a half-precision layout: ``stems.precision.float32_attention``):

- ``_float32_self_attention`` replaces the self-attention ``forward``'s
  ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=..., dropout_p=p)`` (which
  CPU autocast runs in the half type) with ``attend``: the same product in float32, autocast off,
  over keys/values kept in float32 (the buffer of ``_buffered_complete_kv``), the result cast back
  to the half type. The cached cross-attention does the same. PyTorch's CPU flash-attention kernel
  in bfloat16 is slow for a one-query step (it re-packs the past keys at every call: 3.2 ms per
  layer at 550 past positions and batch 3, against 0.8 ms in float32), and float32 scores are the
  more accurate ones. ``attend`` is the one attention of the static decoder too, so ``exact``
  stays bit for bit ``eager``.
"""

from __future__ import annotations

import types

#: Time steps a self-attention key/value buffer grows by when full (256 ≈ 5 s at 50 Hz): few
#: re-allocations per clip, at most this many unused steps held per layer.
_KV_GROWTH_STEPS = 256
#: Attribute an attention module carries when ``install_streaming_caches`` gave it float32 attention.
_FLOAT32 = "_stemgen_float32_attention"


def uses_float32_attention(attention) -> bool:
    """Whether ``attention`` (a ``StreamingMultiheadAttention``) attends in float32 (module doc)."""
    return bool(getattr(attention, _FLOAT32, False))


def attend(q, k, v, *, causal: bool = False, mask=None, float32: bool = False):
    """Scaled dot-product attention of ``q`` ``[rows, heads, queries, head_dim]`` over ``k``/``v``
    ``[rows, heads, keys, head_dim]`` (``torch.nn.functional.scaled_dot_product_attention``,
    dropout 0). ``float32``: computed in float32 with autocast off, whatever the inputs' dtype
    (keys/values already float32 are not copied), and returned in ``q``'s dtype. ``causal``:
    audiocraft's lower-triangular mask (a prefill of several steps); ``mask``: a boolean mask
    broadcast to ``[rows, heads, queries, keys]`` (True: attend)."""
    import torch

    F = torch.nn.functional
    if not float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=0.0)
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             is_causal=causal, dropout_p=0.0)
    return out.to(q.dtype)


def _buffered_complete_kv(self, k, v):
    """``StreamingMultiheadAttention._complete_kv`` that appends the step's keys/values into a
    buffer with spare capacity instead of ``torch.cat``-ing the whole past every step.

    audiocraft's version copies all past keys and values of every layer at every decoding step
    (O(T²) bytes per clip; at batch 3 and 10 s on CPU that took a fifth of the time). The buffer
    grows by ``_KV_GROWTH_STEPS`` when full, so the past is copied once per 256 steps instead of
    at every step. ``past_keys``/``past_values`` stay in the
    streaming state as views of the buffer with the same shape and values as audiocraft's, so the
    mask, rotary offset and ``get/set_streaming_state`` code reads them unchanged; the attention
    sees bitwise the same keys and values. Assumes, as audiocraft's generate does, that a stream
    is never branched (one saved state restored twice and both continued).
    """
    if self.cross_attention or not self._is_streaming or self.past_context is not None or v is k:
        return type(self)._complete_kv(self, k, v)
    import torch
    from audiocraft.modules.transformer import _get_attention_time_dimension

    dim = _get_attention_time_dimension(self.memory_efficient)
    state = self._streaming_state
    past_k, past_v = state.get("past_keys"), state.get("past_values")
    k_buf, v_buf = state.get("kv_buffer_keys"), state.get("kv_buffer_values")
    length = 0 if past_k is None else past_k.shape[dim]
    if past_k is not None and (k_buf is None or k_buf.data_ptr() != past_k.data_ptr()
                               or k_buf.shape[0] != k.shape[0]):
        k_buf, v_buf = past_k, past_v  # a state set from elsewhere: adopt it (copied on growth)
    needed = length + k.shape[dim]
    if k_buf is None or k_buf.shape[dim] < needed:
        capacity = needed + _KV_GROWTH_STEPS
        shape = list(k.shape)
        shape[dim] = capacity
        dtype = torch.float32 if uses_float32_attention(self) else k.dtype
        new_k, new_v = k.new_empty(shape, dtype=dtype), v.new_empty(shape, dtype=dtype)
        if length:
            new_k.narrow(dim, 0, length).copy_(past_k)
            new_v.narrow(dim, 0, length).copy_(past_v)
        k_buf, v_buf = new_k, new_v
    k_buf.narrow(dim, length, k.shape[dim]).copy_(k)
    v_buf.narrow(dim, length, v.shape[dim]).copy_(v)
    nk, nv = k_buf.narrow(dim, 0, needed), v_buf.narrow(dim, 0, needed)
    state["kv_buffer_keys"], state["kv_buffer_values"] = k_buf, v_buf
    state["past_keys"], state["past_values"] = nk, nv
    if "offset" not in state:
        state["offset"] = torch.tensor(0)
    return nk, nv


def _cached_cross_attention(self, query, key, value, key_padding_mask=None, need_weights=False,
                            attn_mask=None, average_attn_weights=True, is_causal=False):
    """Cross-attention ``forward`` that projects the conditioning keys/values once per stream.

    The text conditioning is the same at every decoding step of a generation, but audiocraft
    projects it through two ``dim × dim`` matrices per layer at every step (a sixth of the weights
    read per step for musicgen-small). Within a streaming session the projections are kept in the
    streaming state (cleared when the session ends); the arithmetic is audiocraft's, in the same
    order, so the output is bitwise the same. Anything but the plain streaming case falls back to
    audiocraft's forward.
    """
    from audiocraft.modules import transformer as T

    original = type(self).forward
    if (not self._is_streaming or not self.custom or not self.memory_efficient
            or self.qk_layer_norm is True or attn_mask is not None or key_padding_mask is not None
            or need_weights or is_causal or self.training or self.causal):
        return original(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal)
    import torch
    from einops import rearrange

    layout = "b h t d" if T._get_attention_time_dimension(self.memory_efficient) == 2 else "b t h d"
    state = self._streaming_state
    k, v = state.get("cross_keys"), state.get("cross_values")
    float32 = uses_float32_attention(self)
    if k is None or state["cross_source_shape"] != (tuple(key.shape), tuple(value.shape)):
        k, v = project_cross(self, key, layout, value)
        if float32:
            k, v = k.float(), v.float()
        state["cross_keys"], state["cross_values"] = k, v
        state["cross_source_shape"] = (tuple(key.shape), tuple(value.shape))
    q = project_query(self, query, layout)
    if self.attention_as_float32:
        q, k, v = [x.float() for x in (q, k, v)]
    if T._efficient_attention_backend == "torch":
        x = attend(q, k, v, float32=float32)
    else:
        x = T.ops.memory_efficient_attention(q, k, v, None, p=0)
    x = x.to(query.dtype)
    x = rearrange(x, f"{layout} -> b t (h d)", h=self.num_heads)
    return self.out_proj(x), None


def _float32_self_attention(self, query, key, value, key_padding_mask=None, need_weights=False,
                            attn_mask=None, average_attn_weights=True, is_causal=False):
    """Self-attention ``forward`` whose attention runs in float32 (``attend``; module doc).

    audiocraft's custom memory-efficient branch, op for op, for the plain case (packed
    projection, no rotary embedding, no q/k norm, no repeated key/value heads, unlimited past,
    torch's attention): project, split, complete the keys/values with the past (streaming),
    attend (causal when several steps come at once and no past is held), cast to the query's
    dtype, project out. Anything else falls back to audiocraft's forward.
    """
    from audiocraft.modules import transformer as T

    original = type(self).forward
    several = query.shape[1] > 1
    if (not self.custom or not self.memory_efficient or self.cross_attention or not self.causal
            or self.qk_layer_norm is True or self.rope is not None or self.kv_repeat != 1
            or self.past_context is not None or attn_mask is not None or key_padding_mask is not None
            or need_weights or is_causal or self.training or T._efficient_attention_backend != "torch"
            or query is not key or value is not key
            or (several and self._is_streaming and "past_keys" in self._streaming_state)):
        return original(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal)
    import torch
    from einops import rearrange

    dtype = query.dtype
    projected = torch.nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
    packed = rearrange(projected, "b t (p h d) -> b h p t d", p=3, h=self.num_heads)
    q, k, v = torch.unbind(packed, dim=2)
    k, v = self._complete_kv(k, v)
    if self.attention_as_float32:
        q, k, v = [x.float() for x in (q, k, v)]
    x = attend(q, k, v, causal=several, float32=True)
    x = rearrange(x.to(dtype), "b h t d -> b t (h d)", h=self.num_heads)
    return self.out_proj(x), None


def _rows(attention, part: int):
    """Rows ``part`` (0: query, 1: key, 2: value) of a packed ``in_proj`` weight and bias, as
    audiocraft slices them (``self.in_proj_weight[dim: 2 * dim]``...)."""
    dim = attention.in_proj_weight.shape[0] // 3
    bias = attention.in_proj_bias
    rows = slice(part * dim, (part + 1) * dim)
    return attention.in_proj_weight[rows], None if bias is None else bias[rows]


def project_query(attention, query, layout: str = "b h t d"):
    """A cross-attention's queries of ``query`` ``[rows, steps, dim]``, arranged as ``layout``
    (``"b h t d"``: torch's SDPA; ``"b t h d"``: xformers)."""
    import torch
    from einops import rearrange

    q = torch.nn.functional.linear(query, *_rows(attention, 0))
    return rearrange(q, f"b t (h d) -> {layout}", h=attention.num_heads)


def project_cross(attention, key, layout: str = "b h t d", value=None):
    """A cross-attention's keys and values of the conditioning ``key`` (and ``value``, default
    ``key``) ``[rows, tokens, dim]``, as audiocraft projects them, arranged as ``layout``."""
    import torch
    from einops import rearrange

    value = key if value is None else value
    k = torch.nn.functional.linear(key, *_rows(attention, 1))
    v = torch.nn.functional.linear(value, *_rows(attention, 2))
    return [rearrange(x, f"b t (h d) -> {layout}", h=attention.num_heads) for x in (k, v)]


def install_streaming_caches(lm, *, kv_buffer: bool = True, cross_attention_cache: bool = True,
                             float32_attention: bool = False) -> int:
    """Give the attention modules of a MusicGen language model the two caches above and, with
    ``float32_attention``, attention in float32 (module doc).

    Per module instance (the class and other models are untouched). Returns how many modules
    were changed. Neither cache changes any value computed (see the functions' docs);
    float32 attention changes the attention's rounding, for the eager path and the static
    decoder alike.
    """
    from audiocraft.modules.transformer import StreamingMultiheadAttention

    changed = 0
    for module in lm.modules():
        if not isinstance(module, StreamingMultiheadAttention):
            continue
        if float32_attention:
            setattr(module, _FLOAT32, True)
            if not module.cross_attention:
                module.forward = types.MethodType(_float32_self_attention, module)
        if module.cross_attention and (cross_attention_cache or float32_attention):
            # float32 cross-attention lives in the cached forward: it brings the cache along
            module.forward = types.MethodType(_cached_cross_attention, module)
            changed += 1
        elif not module.cross_attention and kv_buffer:
            module._complete_kv = types.MethodType(_buffered_complete_kv, module)
            changed += 1
        elif float32_attention:
            changed += 1
    return changed


