"""Static key/value cache and CUDA-graph decoding for MusicGen's language model.

audiocraft decodes one token frame per step through its streaming transformer: every step grows
each layer's key/value tensors, re-runs Python for ~900 kernel launches and, on CUDA, casts every
weight under autocast. On a GPU the host side is then 95 % of a step (see docs/benchmarks.md).
This module decodes the same model the way gpt-fast (pytorch-labs) decodes LLaMA:

- **prefill** apart from **decode**: the first step of a generation (text conditioning, a
  continuation's prompt tokens, a melody model's prepended chromagram) runs through audiocraft's
  own streaming forward, unchanged; its keys/values are then copied into a static cache;
- a **static key/value cache**: per layer, ``[rows, heads, capacity, head_dim]`` allocated once;
  a step writes its keys/values at position ``pos`` and attends over a fixed-length prefix with a
  mask, so every step has the same shapes;
- **cross-attention keys/values** of the text conditioning projected once per generation into a
  static buffer (padded, masked);
- **classifier-free guidance** in the same step: conditional and unconditional rows side by side;
- **sampling** (top-k / top-p / temperature) with graph-safe random numbers: the exponential race
  ``argmax(p / Exp(1))``, the fast path ``torch.multinomial`` itself takes for one sample, so the
  tokens are the same as audiocraft's for the same seed (checked in tests);
- the codebook **delay pattern** handled as audiocraft's ``LMModel.generate`` does, without the
  boolean indexing that would synchronise the host every step;
- on CUDA one decoding step per (batch bucket, attended length) **captured as a CUDA graph**
  (``torch.cuda.CUDAGraph``), replayed each step. Batches are padded to the bucket (1, 2, 4, ... 64
  rows); padded rows copy a real row and never reach a result.

Two shapes of the same step:

- ``exact``: no padding, attention over exactly the past (dynamic shapes, no graphs). On the same
  device and precision it gives bitwise the same tokens as audiocraft's eager generate (tests pin
  this on CPU for float32, float16, bfloat16 and int8).
- ``static``: bucket padding and masked attention over a fixed length, what a graph captures. On
  CPU it runs eagerly; in float32 its tokens are eager's bit for bit, in a half layout its logits
  stay within ``TOLERANCE`` of audiocraft's eager forward (a padded batch changes a half-precision
  matmul's shapes, hence its rounding).

Every step runs under the precision layout's autocast (stems.precision), as audiocraft's generate
does, so the casts happen where audiocraft's happen.

Architectures outside what the step implements (rotary or no positional embedding, post-norm
layers, grouped key/values, local attention, two-step guidance, ``sum`` fusing) fall back to
audiocraft's generate: ``unsupported_reason`` says why.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import types
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

from stems.audiocraft_patches import attend, project_cross, project_query, uses_float32_attention
from stems.precision import ENGINE_MODES, autocast, compute_dtype
from stems.sampling import SamplingParams, SamplingTensors, guide, probs_dtype, sample_next

__all__ = ["ENGINE_MODES", "SamplingParams", "StaticDecoder", "sample_next"]
#: Batch-size buckets a static step is padded to (rows before classifier-free guidance doubles them).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def unsupported_reason(lm) -> str | None:
    """Why static decoding cannot run this language model (None: it can).

    Args:
        lm: audiocraft ``LMModel``.
    """
    from audiocraft.modules.transformer import StreamingTransformerLayer

    transformer = lm.transformer
    if transformer.positional_embedding != "sin":
        return f"positional embedding {transformer.positional_embedding!r} (only 'sin')"
    if lm.two_step_cfg:
        return "two-step classifier-free guidance"
    fuse = lm.fuser.fuse2cond
    if fuse.get("sum") or fuse.get("input_interpolate"):
        return "conditions fused by sum/interpolation at every step"
    for layer in transformer.layers:
        if not isinstance(layer, StreamingTransformerLayer) or not layer.norm_first:
            return "post-norm or unknown transformer layer"
        sa = layer.self_attn
        if (not sa.custom or sa.kv_repeat != 1 or sa.rope is not None or sa.past_context is not None
                or sa.qk_layer_norm or sa.attention_as_float32):
            return "self-attention variant (kv_repeat, rope, local attention, qk norm or float32)"
        ca = layer.cross_attention
        if ca is not None and (not ca.custom or ca.qk_layer_norm or ca.attention_as_float32):
            return "cross-attention variant"
    return None


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket holding ``rows`` (None when ``rows`` exceeds the largest)."""
    for size in sorted(buckets):
        if size >= rows:
            return size
    return None


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The buckets for a batcher of ``max_batch`` clips: the default buckets below it and
    ``max_batch`` itself."""
    return tuple(b for b in DEFAULT_BUCKETS if b < max_batch) + (max_batch,)


@dataclass
class DecodeStats:
    """What the decoder did since start (reported by health checks and the bench)."""

    generations: int = 0
    steps: int = 0
    graph_steps: int = 0
    fallbacks: int = 0
    last_fallback: str | None = None
    graphs: int = 0
    capture_seconds: float = 0.0
    #: bytes the captured graphs' memory pool holds (CUDA, measured around the capture)
    graph_pool_bytes: int = 0
    #: steps a graph mode decoder ran uncaptured (a bucket or length without a graph)
    uncaptured_steps: int = 0
    buckets_used: dict = field(default_factory=dict)


class StaticDecoder:
    """Decodes MusicGen tokens with a static key/value cache (and CUDA graphs on CUDA).

    Installed on a loaded ``LMModel`` by ``install``: its ``generate`` then runs here, with the
    same arguments and result as ``LMModel.generate``.

    Args:
        lm: audiocraft ``LMModel`` (eval mode).
        shape: "exact" (no padding, dynamic lengths) or "static" (bucket padding, masked
            attention over fixed lengths).
        graphs: capture and replay CUDA graphs (``static`` shape on a CUDA device only).
        buckets: batch-size buckets (rows before guidance doubles them).
        capacity_steps: most transformer positions a generation may use (prefix + tokens); the
            static cache holds that many per row. Longer generations fall back to eager.
        kv_chunk_steps: a static step attends over the smallest multiple of this many positions
            that covers the past (one graph per multiple): short clips read a short cache.
        max_cross_tokens: most conditioning tokens the cross-attention buffer holds.
        precision: the layout ``lm`` is in (stems.precision.apply_layout): the step runs under
            its autocast, as audiocraft's generate does, and the static cache holds keys/values
            in its compute dtype.

    Raises:
        ValueError: for an unknown shape, graphs on a non-CUDA device or in ``exact`` shape.
    """

    def __init__(self, lm, *, shape: str = "static", graphs: bool = False,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, capacity_steps: int = 1536,
                 kv_chunk_steps: int = 256, max_cross_tokens: int = 128,
                 precision: str = "float32"):
        import torch

        if shape not in ("exact", "static"):
            raise ValueError("shape must be 'exact' or 'static'")
        device = next(iter(lm.parameters())).device
        if graphs and (shape != "static" or device.type != "cuda"):
            raise ValueError("CUDA graphs need the static shape on a CUDA device")
        self.lm = lm
        self.shape = shape
        self.graphs = graphs
        self.buckets = tuple(sorted(set(buckets)))
        self.kv_chunk = int(kv_chunk_steps)
        self.capacity = int(math.ceil(capacity_steps / self.kv_chunk) * self.kv_chunk)
        self.max_cross = int(max_cross_tokens)
        self.device = device
        self.precision = precision
        #: dtype of the keys/values: what the attention projections output under autocast, or
        #: float32 where the model attends in float32 (stems.audiocraft_patches.attend)
        self.float32_attention = uses_float32_attention(lm.transformer.layers[0].self_attn)
        self.dtype = (torch.float32 if self.float32_attention
                      else compute_dtype(precision) or torch.float32)
        #: the generation's sampling settings, written before its first step (graphs read them)
        self.sampling = SamplingTensors(device)
        #: dtype of the Exp(1) draws (stems.sampling.probs_dtype)
        self.noise_dtype = probs_dtype(precision, device.type)
        #: when a list, each static/exact step appends its guided logits (self-check, bench)
        self.recorded: list | None = None
        #: the pattern sequence and conditions of the latest generation (with ``recorded``)
        self.last_generation: tuple | None = None
        self._recorded_rows: int | None = None
        self.stats = DecodeStats()
        self._torch = torch
        self._original_generate = type(lm).generate.__get__(lm)
        layer = lm.transformer.layers[0]
        self._heads = layer.self_attn.num_heads
        self._dim = layer.self_attn.embed_dim
        self._cross = layer.cross_attention is not None
        #: why this model decodes through audiocraft's generate instead (None: it does not)
        self.unsupported = unsupported_reason(lm)
        self._buffers: dict | None = None
        self._graphs: dict[tuple, object] = {}
        self._pool = None
        self._lock = threading.RLock()

    # --- installation ----------------------------------------------------------------------------
    def install(self) -> "StaticDecoder":
        """Route ``lm.generate`` (this instance only) through the decoder."""
        decoder = self

        def generate(lm_self, *args, **kwargs):
            return decoder.generate(*args, **kwargs)

        self.lm.generate = types.MethodType(generate, self.lm)
        return self

    # --- generation ------------------------------------------------------------------------------
    def generate(self, prompt=None, conditions=(), num_samples=None, max_gen_len: int = 256,
                 use_sampling: bool = True, temp: float = 1.0, top_k: int = 250,
                 top_p: float = 0.0, cfg_coef: float | None = None, two_step_cfg=None,
                 remove_prompts: bool = False, check: bool = False, callback=None, **kwargs):
        """``LMModel.generate`` (same arguments, same ``[B, K, T]`` int64 codes) with the first
        step through audiocraft and the rest through the static step."""
        torch = self._torch
        lm = self.lm
        conditions = list(conditions)

        def fallback(reason: str):
            """audiocraft's generate on the caller's own arguments (called before any random
            number is drawn, so the result is eager's)."""
            self.stats.fallbacks += 1
            if self.stats.last_fallback != reason:
                log.info("static decoding falls back to audiocraft's generate: %s", reason)
            self.stats.last_fallback = reason
            return self._original_generate(
                prompt, conditions, num_samples, max_gen_len, use_sampling, temp, top_k, top_p,
                cfg_coef, two_step_cfg, remove_prompts, check, callback, **kwargs)

        reason = self.unsupported if not two_step_cfg else "two-step classifier-free guidance"
        if reason is None and check:
            reason = "check=True"
        if reason is not None:
            return fallback(reason)
        from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

        num_samples = (num_samples if num_samples is not None
                       else prompt.shape[0] if prompt is not None else len(conditions) or 1)
        if conditions:
            null_conditions = ClassifierFreeGuidanceDropout(p=1.0)(conditions)
            cfg_conditions = lm.condition_provider(
                lm.condition_provider.tokenize(conditions + null_conditions))
        else:
            cfg_conditions = {}
        prompted = prompt if prompt is not None else torch.zeros(
            (num_samples, lm.num_codebooks, 0), dtype=torch.long, device=self.device)
        B, K, T = prompted.shape
        params = SamplingParams(top_k=int(top_k), top_p=float(top_p), temperature=float(temp),
                                cfg_coef=float(lm.cfg_coef if cfg_coef is None else cfg_coef),
                                use_sampling=bool(use_sampling))
        pattern = lm.pattern_provider.get_pattern(max_gen_len)
        unknown = -1
        gen_codes = torch.full((B, K, max_gen_len), unknown, dtype=torch.long, device=self.device)
        gen_codes[..., :T] = prompted
        gen_sequence, _, mask = pattern.build_pattern_sequence(gen_codes, lm.special_token_id)
        start = pattern.get_first_step_with_timesteps(T)
        length = gen_sequence.shape[-1]
        bucket = B if self.shape == "exact" else bucket_for(B, self.buckets)
        if bucket is None:
            return fallback(f"batch {B} above the largest bucket {self.buckets[-1]}")
        cfg = bool(cfg_conditions)
        fuse = lm.fuser.fuse2cond
        prefix = sum(cfg_conditions[name][0].shape[1] for name in fuse.get("prepend", ())
                     if name in cfg_conditions)
        cross_tokens = sum(cfg_conditions[name][0].shape[1] for name in fuse.get("cross", ())
                           if name in cfg_conditions)
        needed = prefix + length  # transformer positions: prepended conditions + every step
        if self.shape == "static" and (needed > self.capacity or cross_tokens > self.max_cross):
            return fallback(f"{needed} positions / {cross_tokens} conditioning tokens above the "
                            f"static capacity {self.capacity} / {self.max_cross}")

        def write(offset: int, next_token) -> None:
            valid = mask[..., offset:offset + 1].expand(B, -1, -1)
            next_token = torch.where(valid, next_token,
                                     torch.full_like(next_token, lm.special_token_id))
            column = gen_sequence[..., offset:offset + 1]
            gen_sequence[..., offset:offset + 1] = torch.where(column == unknown, next_token, column)
            if callback is not None:
                callback(1 + offset - start, length - start)

        with self._lock, autocast(self.precision, self.device.type):
            with lm.streaming():
                # Prefill: audiocraft's own step (prompt tokens, prepended conditions).
                first = lm._sample_next_token(gen_sequence[..., 0:start], cfg_conditions, {},
                                              use_sampling, temp, top_k, top_p,
                                              cfg_coef=cfg_coef, two_step_cfg=False)
                pos = int(lm.transformer._streaming_state["offsets"][0])
                prefilled = self._harvest(B, bucket, cfg, needed, cfg_conditions)
            write(start, first)
            self.sampling.write(params, lm.card)
            self._recorded_rows = B
            step = self._stepper(B, bucket, cfg, params.draws, prefilled)
            for offset in range(start + 1, length):
                write(offset, step(gen_sequence[..., offset - 1], pos))
                pos += 1
            if self.recorded is not None:
                self.last_generation = (gen_sequence, cfg_conditions, params, start)
            self.stats.generations += 1
            self.stats.steps += length - start - 1
            self.stats.buckets_used[bucket] = self.stats.buckets_used.get(bucket, 0) + 1
        out_codes, _, _ = pattern.revert_pattern_sequence(gen_sequence, special_token=unknown)
        out_start = T if remove_prompts else 0
        return out_codes[..., out_start:max_gen_len]

    # --- cache -----------------------------------------------------------------------------------
    def _static_buffers(self) -> dict:
        """The static cache, allocated once for the largest bucket (smaller buckets use row
        prefixes of it, so every graph reads and writes fixed addresses)."""
        if self._buffers is None:
            torch = self._torch
            rows = 2 * self.buckets[-1]
            head_dim = self._dim // self._heads
            layers = len(self.lm.transformer.layers)
            kv = (layers, rows, self._heads, self.capacity, head_dim)
            cross = (layers, rows, self._heads, self.max_cross, head_dim)
            options = {"dtype": self.dtype, "device": self.device}
            self._buffers = {
                "keys": torch.zeros(kv, **options), "values": torch.zeros(kv, **options),
                "cross_keys": torch.zeros(cross, **options) if self._cross else None,
                "cross_values": torch.zeros(cross, **options) if self._cross else None,
                "cross_valid": torch.zeros((1, 1, 1, self.max_cross), dtype=torch.bool,
                                           device=self.device),
                "tokens": torch.zeros((rows // 2, self.lm.num_codebooks), dtype=torch.long,
                                      device=self.device),
                "pos": torch.zeros((), dtype=torch.long, device=self.device),
                "out": torch.zeros((rows // 2, self.lm.num_codebooks, 1), dtype=torch.long,
                                   device=self.device),
                "noise": torch.ones((rows // 2, self.lm.num_codebooks, self.lm.card),
                                    dtype=self.noise_dtype, device=self.device),
            }
        return self._buffers

    def _static_views(self, bucket: int, halves: int) -> dict:
        """Per layer, the static cache's rows of ``bucket`` (``halves`` × bucket rows: with
        guidance, conditional then unconditional): the fixed addresses a captured step reads."""
        buffers = self._static_buffers()
        rows = halves * bucket
        layers = range(len(self.lm.transformer.layers))
        names = ("keys", "values", "cross_keys", "cross_values") if self._cross else ("keys", "values")
        views = {name: [buffers[name][i, :rows] for i in layers] for name in names}
        return {"cross_keys": [], "cross_values": [], **views}

    def _harvest(self, batch: int, bucket: int, cfg: bool, needed: int, cfg_conditions) -> dict:
        """Copy the prefill's keys/values (audiocraft's streaming state) into the cache and
        project the cross-attention keys/values. Rows are laid out ``[conditional bucket;
        unconditional bucket]``; padded rows copy the first real row of their half."""
        torch = self._torch
        lm = self.lm
        layers = lm.transformer.layers
        halves = 2 if cfg else 1
        if self.shape == "exact":
            cache = {"keys": [], "values": [], "cross_keys": [], "cross_values": []}
        else:
            cache = self._static_views(bucket, halves)
        cross_src = None
        if self._cross:
            # the fuser's input is the embeddings' sum: float32 in every layout
            _, cross_src = lm.fuser(torch.zeros((halves * batch, 0, self._dim), device=self.device),
                                    cfg_conditions)
        for i, layer in enumerate(layers):
            state = layer.self_attn._streaming_state
            past_k, past_v = state["past_keys"], state["past_values"]  # [halves*B, H, pos, D]
            if self.shape == "exact":
                shape = list(past_k.shape)
                shape[2] = needed
                k, v = past_k.new_empty(shape), past_v.new_empty(shape)
                k[:, :, :past_k.shape[2]] = past_k
                v[:, :, :past_v.shape[2]] = past_v
                cache["keys"].append(k)
                cache["values"].append(v)
            else:
                for target, source in ((cache["keys"][i], past_k), (cache["values"][i], past_v)):
                    _copy_rows(target, source.to(self.dtype), batch, bucket, halves, source.shape[2])
            if cross_src is not None:
                ck, cv = project_cross(layer.cross_attention, cross_src, "b h t d")
                if self.float32_attention:  # as the cached cross-attention keeps them
                    ck, cv = ck.float(), cv.float()
                if self.shape == "exact":
                    cache["cross_keys"].append(ck)
                    cache["cross_values"].append(cv)
                else:
                    for name, source in (("cross_keys", ck), ("cross_values", cv)):
                        target = cache[name][i]
                        target.zero_()
                        _copy_rows(target, source.to(self.dtype), batch, bucket, halves,
                                   source.shape[2])
        if cross_src is not None and self.shape == "static":
            valid = self._buffers["cross_valid"]
            valid.zero_()
            valid[..., :cross_src.shape[1]] = True
        return cache

    # --- the step --------------------------------------------------------------------------------
    def _stepper(self, batch: int, bucket: int, cfg: bool, draws: bool, cache: dict):
        """A function ``(tokens [B, K] int64, pos: int) -> next tokens [B, K, 1]``; ``draws``:
        whether the generation samples (Exp(1) draws for the real rows before each step)."""
        torch = self._torch
        guidance = self.sampling.cfg_coef if cfg else None
        if self.shape == "exact":
            def exact(tokens, pos):
                logits = self._forward(tokens, pos, cache, guidance, batch, kv_len=None)
                noise = torch.empty_like(logits, dtype=self.noise_dtype)
                if draws:
                    noise.exponential_(1)
                return sample_next(logits, self.sampling, noise)
            return exact
        buffers = self._buffers
        static_tokens = buffers["tokens"][:bucket]
        static_pos = buffers["pos"]
        static_out = buffers["out"][:bucket]
        static_noise = buffers["noise"][:bucket]

        def padded(tokens) -> None:
            static_tokens[:batch].copy_(tokens)
            if bucket > batch:
                static_tokens[batch:].copy_(tokens[:1].expand(bucket - batch, -1))
            if draws:  # the real rows' draws only: padding does not shift the generator
                static_noise[:batch].exponential_(1)

        def static(tokens, pos):
            padded(tokens)
            static_pos.fill_(pos)
            logits = self._forward(static_tokens, static_pos, cache, guidance, bucket,
                                   kv_len=self._kv_len(pos))
            return sample_next(logits, self.sampling, static_noise)[:batch]

        if not self.graphs or not cfg:
            return static

        def replay(tokens, pos):
            graph = self._graphs.get((bucket, self._kv_len(pos)))
            if graph is None:  # not captured at start: run the same step uncaptured
                self.stats.uncaptured_steps += 1
                return static(tokens, pos)
            padded(tokens)
            static_pos.fill_(pos)
            graph.replay()
            self.stats.graph_steps += 1
            return static_out[:batch]
        return replay

    def _kv_len(self, pos: int) -> int:
        return min(self.capacity, (pos // self.kv_chunk + 1) * self.kv_chunk)

    def _forward(self, tokens, pos, cache: dict, cfg: float | None, rows: int,
                 kv_len: int | None):
        """One transformer step. ``tokens`` ``[rows, K]``; ``pos`` an int (exact) or a 0-d int64
        tensor (static); ``cfg`` the guidance coefficient (None: no guidance rows); returns guided
        logits ``[rows, K, card]``.

        The arithmetic follows audiocraft's modules op for op (embeddings summed, sin positional
        embedding, pre-norm layers with scaled-dot-product attention, output norm, one linear per
        codebook, ``uncond + (cond - uncond) * cfg_coef``), reusing the layers' own norm,
        feed-forward and layer-scale modules.
        """
        torch = self._torch
        F = torch.nn.functional
        from audiocraft.modules.transformer import create_sin_embedding

        lm = self.lm
        K = lm.num_codebooks
        x = sum([lm.emb[k](tokens[:, k]) for k in range(K)])[:, None, :]  # [rows, 1, dim]
        if cfg is not None:
            x = torch.cat([x, x], dim=0)
        transformer = lm.transformer
        if isinstance(pos, int):
            positions = torch.full((1, 1, 1), pos, dtype=torch.long, device=x.device)
        else:
            positions = pos.view(1, 1, 1)
        pos_emb = create_sin_embedding(positions, x.shape[-1], max_period=transformer.max_period,
                                       dtype=x.dtype)
        x = x + transformer.positional_scale * pos_emb
        heads = self._heads
        if kv_len is not None:
            self_mask = (torch.arange(kv_len, device=x.device) <= pos).view(1, 1, 1, kv_len)
            cross_mask = self._buffers["cross_valid"]
        f32 = self.float32_attention
        for i, layer in enumerate(transformer.layers):
            sa = layer.self_attn
            h = layer.norm1(x)
            projected = F.linear(h, sa.in_proj_weight, sa.in_proj_bias)
            packed = projected.view(x.shape[0], 1, 3, heads, -1).permute(0, 3, 2, 1, 4)
            q, k, v = torch.unbind(packed, dim=2)  # [rows, heads, 1, head_dim]
            keys, values = cache["keys"][i], cache["values"][i]
            if kv_len is None:
                keys[:, :, pos:pos + 1] = k
                values[:, :, pos:pos + 1] = v
                a = attend(q, keys[:, :, :pos + 1], values[:, :, :pos + 1], float32=f32)
            else:
                keys.index_copy_(2, pos.view(1), k.to(keys.dtype))
                values.index_copy_(2, pos.view(1), v.to(values.dtype))
                a = attend(q, keys[:, :, :kv_len], values[:, :, :kv_len], mask=self_mask, float32=f32)
            # audiocraft: x.to(dtype), dtype the query's (the norm's output) before out_proj
            a = a.to(h.dtype).permute(0, 2, 1, 3).reshape(x.shape[0], 1, -1)
            x = x + layer.layer_scale_1(sa.out_proj(a))
            if self._cross:
                ca = layer.cross_attention
                h = layer.norm_cross(x)
                q = project_query(ca, h, "b h t d")
                ck, cv = cache["cross_keys"][i], cache["cross_values"][i]
                a = attend(q, ck, cv, mask=None if kv_len is None else cross_mask, float32=f32)
                a = a.to(h.dtype).permute(0, 2, 1, 3).reshape(x.shape[0], 1, -1)
                x = x + layer.layer_scale_cross(ca.out_proj(a))
            x = x + layer.layer_scale_2(layer._ff_block(layer.norm2(x)))
        if lm.out_norm:
            x = lm.out_norm(x)
        logits = torch.stack([lm.linears[k](x) for k in range(K)], dim=1)[:, :, 0]  # [r, K, card]
        if cfg is not None:
            cond, uncond = logits.split(rows, dim=0)
            logits = guide(cond, uncond, cfg)
        if self.recorded is not None:
            self.recorded.append(logits[:self._recorded_rows].float().clone())
        return logits

    # --- CUDA graphs -----------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the static cache (keys/values of every layer for the largest bucket's rows
        with guidance, plus the cross-attention buffers): ``2 × layers × 2 × bucket × capacity ×
        dim × itemsize`` for the self-attention part."""
        layers = len(self.lm.transformer.layers)
        itemsize = self._torch.empty((), dtype=self.dtype).element_size()
        positions = self.capacity + (self.max_cross if self._cross else 0)
        return 2 * layers * 2 * self.buckets[-1] * positions * self._dim * itemsize

    def graph_body(self, bucket: int, kv_len: int):
        """What a graph of (``bucket``, ``kv_len``) captures: the guided static step reading the
        static tokens, position, sampling settings and draws, writing ``buffers["out"]``. Run
        directly it is the uncaptured step (tests drive it on CPU in place of a replay)."""
        buffers = self._static_buffers()
        cache = self._static_views(bucket, 2)
        static_tokens, static_pos = buffers["tokens"][:bucket], buffers["pos"]
        static_out, static_noise = buffers["out"][:bucket], buffers["noise"][:bucket]

        def step():
            logits = self._forward(static_tokens, static_pos, cache, self.sampling.cfg_coef,
                                   bucket, kv_len=kv_len)
            static_out.copy_(sample_next(logits, self.sampling, static_noise))
        return step

    def capture(self, largest: int | None = None) -> float:
        """Capture the guided step of every bucket up to ``largest`` (default: all) at every
        attended length: the whole graph set, keyed by (bucket, attended length) only. Called
        once at start; ``generate`` never captures. Returns seconds; the pool's bytes go to
        ``stats.graph_pool_bytes``.

        A captured step reads its sampling settings and Exp(1) draws from tensors written before
        each replay (stems.sampling), so one graph serves every request's settings and capturing
        draws no random numbers.

        Raises:
            ValueError: outside graph mode.
        """
        if not self.graphs:
            raise ValueError("capture needs graph mode")
        torch = self._torch
        started = time.perf_counter()
        buckets = [b for b in self.buckets if largest is None or b <= max(largest, self.buckets[0])]
        buffers = self._static_buffers()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        static_pos = buffers["pos"]
        saved_pos = static_pos.clone()
        with self._lock, torch.inference_mode(), autocast(self.precision, "cuda", cache_enabled=False):
            for bucket in buckets:
                for kv_len in range(self.kv_chunk, self.capacity + 1, self.kv_chunk):
                    if (bucket, kv_len) in self._graphs:
                        continue
                    step = self.graph_body(bucket, kv_len)
                    static_pos.fill_(kv_len - 1)
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        for _ in range(2):  # lazy initialisation (cuBLAS handles, workspaces)
                            step()
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        step()
                    self._graphs[(bucket, kv_len)] = graph
        torch.cuda.synchronize(self.device)
        static_pos.copy_(saved_pos)
        seconds = time.perf_counter() - started
        self.stats.graphs = len(self._graphs)
        self.stats.capture_seconds += seconds
        self.stats.graph_pool_bytes += torch.cuda.memory_reserved(self.device) - before
        return seconds


def _copy_rows(target, source, batch: int, bucket: int, halves: int, length: int) -> None:
    """Copy ``source`` rows ``[half * batch + b]`` into ``target`` rows ``[half * bucket + b]``
    (first ``length`` positions of dim 2); padded rows get a copy of their half's first row."""
    for half in range(halves):
        src = source[half * batch:(half + 1) * batch, :, :length]
        dst = target[half * bucket:(half + 1) * bucket, :, :length]
        dst[:batch].copy_(src)
        if bucket > batch:
            dst[batch:].copy_(src[:1].expand(bucket - batch, -1, -1, -1))



class DecodingBudgetError(RuntimeError):
    """The static cache of BATCH_MAX_SIZE rows does not fit in the device's free memory."""


def check_budget(decoder: StaticDecoder) -> int:
    """Check, before anything is allocated, that the static cache fits in the CUDA device's free
    memory with a quarter to spare for the graphs' pool, activations and EnCodec. Returns the
    cache's bytes (nothing checked off CUDA).

    Raises:
        DecodingBudgetError: naming BATCH_MAX_SIZE, the bytes needed and the bytes free.
    """
    needed = decoder.cache_bytes()
    if decoder.device.type != "cuda" or decoder._buffers is not None:
        return needed
    free, _ = decoder._torch.cuda.mem_get_info(decoder.device)
    if needed > 0.75 * free:
        raise DecodingBudgetError(
            f"BATCH_MAX_SIZE={decoder.buckets[-1]}: the static cache needs {needed / 2**30:.2f} GiB "
            f"({decoder.capacity} positions per row), {free / 2**30:.2f} GiB free on {decoder.device}; "
            "lower BATCH_MAX_SIZE")
    return needed


def teacher_forced(decoder: StaticDecoder):
    """The latest recorded generation's step logits next to audiocraft's eager forward
    (``LMModel.forward`` over the whole pattern sequence, under the same autocast, with the same
    conditions and guidance): the reference the self-check and the CPU layout tests compare with.

    Returns:
        (static, eager): float32 ``[steps, rows, codebooks, card]`` each.

    Raises:
        RuntimeError: when no generation was recorded (set ``decoder.recorded = []`` first).
    """
    import torch

    if not decoder.recorded or decoder.last_generation is None:
        raise RuntimeError("no recorded generation")
    gen_sequence, cfg_conditions, params, start = decoder.last_generation
    lm = decoder.lm
    rows, length = gen_sequence.shape[0], gen_sequence.shape[-1]
    sequence = gen_sequence[..., :-1]
    with torch.inference_mode(), autocast(decoder.precision, decoder.device.type):
        if cfg_conditions:
            both = lm(torch.cat([sequence, sequence]), conditions=[], condition_tensors=cfg_conditions)
            cond, uncond = both.split(rows, dim=0)
            logits = uncond + (cond - uncond) * params.cfg_coef
        else:
            logits = lm(sequence, conditions=[], condition_tensors={})
    eager = logits[:, :, start:length - 1].permute(2, 0, 1, 3).float()
    return torch.stack(decoder.recorded[-eager.shape[0]:]), eager


def compare(static, eager) -> dict:
    """Relative error ``‖static − eager‖ / ‖eager‖`` of two logit sets and the share of equal
    argmax tokens (greedy agreement, teacher-forced: no error carried from step to step)."""
    import torch

    error = float(torch.linalg.vector_norm(static - eager) / torch.linalg.vector_norm(eager))
    agreement = float((static.argmax(-1) == eager.argmax(-1)).float().mean())
    return {"relative_error": error, "token_agreement": agreement}


#: Relative logit error the static step may show against audiocraft's eager forward, per
#: precision. Both run the same casts; they differ in summation order (one step against the
#: whole sequence, a masked fixed-length attention against the exact past), which costs a few
#: units in the last place of the compute dtype: float32 ~1e-7, bfloat16 2^-8 ≈ 4e-3, float16
#: 2^-11 ≈ 5e-4 per rounding, accumulated over the layers.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2, "int8": 5e-2}
