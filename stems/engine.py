"""The MusicGen engine: loads a model once and generates batches of stems.

Wraps audiocraft's ``MusicGen`` (Copet et al. 2023). Loading goes through
``MusicGen.get_pretrained(name_or_dir)``, the same call for a hub id (``facebook/musicgen-small``), a
local checkpoint directory, or ``tiny`` (a random-weight checkpoint written by stems.checkpoint).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stems import xformers_stand_in

log = logging.getLogger(__name__)

TINY = "tiny"


class ModelLoadError(RuntimeError):
    """The MusicGen model could not be loaded (unknown id, missing files, no network for the hub)."""


class GenerationError(RuntimeError):
    """MusicGen failed while generating."""


@dataclass(frozen=True)
class SamplingParams:
    """MusicGen sampling settings (audiocraft's ``set_generation_params``)."""

    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0


ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, eq=False)
class AudioConditioning:
    """Audio that conditions a generation besides the text.

    - ``"chroma"``: the chromagram of ``audio`` conditions a melody MusicGen
      (``MusicGen.generate_with_chroma``; musicgen-melody and musicgen-stereo-melody only): the
      generation follows its harmony.
    - ``"continuation"``: the generation continues ``audio`` (``MusicGen.generate_continuation``);
      only the continuation is returned, not the prompt.

    Attributes:
        kind: "chroma" or "continuation".
        audio: float32 ``[channels, samples]``.
        sample_rate: Hz of ``audio`` (audiocraft resamples it to the model's rate).
        fingerprint: identifies the audio (e.g. a hash of the plan or of the source file): rows of
            a batched call share one conditioning, so only equal fingerprints are batched together.
    """

    kind: str
    audio: np.ndarray
    sample_rate: int
    fingerprint: str

    def __post_init__(self):
        if self.kind not in ("chroma", "continuation"):
            raise ValueError(f"unknown conditioning kind {self.kind!r}")
        if np.asarray(self.audio).ndim != 2:
            raise ValueError("conditioning audio must be [channels, samples]")


def resolve_device(device: str = "auto") -> str:
    """Map "auto" to "cuda" when a CUDA device is visible, else "cpu"; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: Random-weight checkpoints written on first use (tests, offline runs): a text model and a
#: melody-conditioned one (chroma conditioner; its tiny htdemucs lives in the checkpoint directory).
TINY_MODELS = {"tiny": False, "tiny-melody": True}


def tiny_checkpoint_dir(name: str = TINY) -> Path:
    """Directory of the shared tiny checkpoint ``name`` (see TINY_MODELS), written once
    (atomically) on first use."""
    from stems.checkpoint import cache_dir, is_checkpoint_dir, write_checkpoint

    melody = TINY_MODELS[name]
    target = cache_dir() / ("tiny-musicgen-melody" if melody else "tiny-musicgen")
    if not is_checkpoint_dir(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
        # a melody model's window must exceed audiocraft's default extend stride (18 s)
        write_checkpoint(staging, "tiny", seed=0, melody=melody, max_duration_seconds=30.0)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its checkpoint is identical
            pass
    return target


def _model_source(name: str) -> str:
    if name in TINY_MODELS:
        return str(tiny_checkpoint_dir(name))
    return name


def _load_musicgen(source: str, device: str):
    """``MusicGen.get_pretrained(source)``; a checkpoint directory that carries its own torch.hub
    cache (``stems.checkpoint.melody_torch_home``: the tiny htdemucs a melody conditioner loads)
    is loaded with TORCH_HOME pointing there."""
    from audiocraft.models import MusicGen
    from stems.checkpoint import codec_deprecation_silenced, melody_environment, melody_torch_home

    with codec_deprecation_silenced():
        if melody_torch_home(source).is_dir():
            with melody_environment(source):
                return MusicGen.get_pretrained(source, device=device)
        return MusicGen.get_pretrained(source, device=device)


ATTENTION_BACKENDS = ("torch", "xformers")
PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def resolve_mode(mode: str, device: str) -> str:
    """ENGINE_MODE "auto": CUDA-graph decoding on CUDA, audiocraft's eager generate on CPU (where
    the host is not the bottleneck: bench/decoding measures both). Other values pass through."""
    from stems.decoding import ENGINE_MODES

    if mode not in ENGINE_MODES:
        raise ValueError(f"engine mode must be one of {ENGINE_MODES}")
    if mode == "auto":
        return "graph" if device.startswith("cuda") else "eager"
    return mode


def resolve_precision(precision: str, device: str, mode: str) -> str:
    """ENGINE_PRECISION "auto": float16 language-model weights on CUDA for the static and graph
    modes (audiocraft runs MusicGen under float16 autocast on CUDA, so the weights it casts at every
    op are held in that type instead), float32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "auto":
        return "float16" if device.startswith("cuda") and mode in ("static", "graph") else "float32"
    return precision

#: Time steps a self-attention key/value buffer grows by when full (256 ≈ 5 s at 50 Hz): few
#: re-allocations per clip, at most this many unused steps held per layer.
_KV_GROWTH_STEPS = 256


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
        new_k, new_v = k.new_empty(shape), v.new_empty(shape)
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
    dim = self.in_proj_weight.shape[0] // 3
    bias = self.in_proj_bias
    state = self._streaming_state
    k, v = state.get("cross_keys"), state.get("cross_values")
    if k is None or state["cross_source_shape"] != (tuple(key.shape), tuple(value.shape)):
        k = torch.nn.functional.linear(key, self.in_proj_weight[dim: 2 * dim],
                                       None if bias is None else bias[dim: 2 * dim])
        v = torch.nn.functional.linear(value, self.in_proj_weight[2 * dim:],
                                       None if bias is None else bias[2 * dim:])
        k, v = [rearrange(x, f"b t (h d) -> {layout}", h=self.num_heads) for x in (k, v)]
        state["cross_keys"], state["cross_values"] = k, v
        state["cross_source_shape"] = (tuple(key.shape), tuple(value.shape))
    q = torch.nn.functional.linear(query, self.in_proj_weight[:dim], None if bias is None else bias[:dim])
    q = rearrange(q, f"b t (h d) -> {layout}", h=self.num_heads)
    if self.attention_as_float32:
        q, k, v = [x.float() for x in (q, k, v)]
    if T._efficient_attention_backend == "torch":
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False, dropout_p=0)
    else:
        x = T.ops.memory_efficient_attention(q, k, v, None, p=0)
    x = x.to(query.dtype)
    x = rearrange(x, f"{layout} -> b t (h d)", h=self.num_heads)
    return self.out_proj(x), None


def install_streaming_caches(lm, *, kv_buffer: bool = True, cross_attention_cache: bool = True) -> int:
    """Give the attention modules of a MusicGen language model the two caches above.

    Per module instance (the class and other models are untouched). Returns how many modules
    were changed. Neither cache changes any value computed (see the functions' docs).
    """
    from audiocraft.modules.transformer import StreamingMultiheadAttention

    changed = 0
    for module in lm.modules():
        if not isinstance(module, StreamingMultiheadAttention):
            continue
        if module.cross_attention and cross_attention_cache:
            module.forward = types.MethodType(_cached_cross_attention, module)
            changed += 1
        elif not module.cross_attention and kv_buffer:
            module._complete_kv = types.MethodType(_buffered_complete_kv, module)
            changed += 1
    return changed


class StemEngine:
    """One loaded MusicGen, shared by every stem a worker process generates.

    Speed settings (none changes the model's arithmetic: precision, weights and steps stay as
    audiocraft has them; on CUDA audiocraft itself runs the LM in float16 under autocast):

    Args:
        model: hub id, local checkpoint directory, or "tiny".
        device: "auto", "cpu", "cuda" or "cuda:N".
        num_threads: intra-op threads torch uses while generating (``torch.set_num_threads`` on
            the generating thread); None keeps torch's default (one per core).
        attention_backend: audiocraft's ``set_efficient_attention_backend`` ("torch": PyTorch
            SDPA; "xformers": needs a working xformers build, CUDA only). Process-wide.
        kv_buffer: append self-attention keys/values into a growing buffer instead of
            re-concatenating the past at every step (see ``install_streaming_caches``).
        cross_attention_cache: project the text conditioning once per generation instead of at
            every step.
        mode: how tokens are decoded (stems.decoding): "eager" (audiocraft's generate, the
            reference), "exact" (static-cache step, unpadded: bitwise the same tokens as eager),
            "static" (bucket-padded, fixed-shape step), "graph" (the static step replayed as CUDA
            graphs; CUDA only), "auto" (see ``resolve_mode``).
        precision: language-model weights' dtype; "auto" see ``resolve_precision``. Under
            "float16"/"bfloat16" the static step runs without autocast.
        buckets: batch-size buckets of the static and graph modes.
        capacity_seconds: longest window a static cache holds (default: the model's window).

    Raises:
        ModelLoadError: when audiocraft cannot load the model.
        ValueError: for an unknown attention backend, mode or precision, graphs without CUDA, or
            a non-positive thread count.
    """

    def __init__(self, model: str, device: str = "auto", *, num_threads: int | None = None,
                 attention_backend: str = "torch", kv_buffer: bool = True,
                 cross_attention_cache: bool = True, mode: str = "auto",
                 precision: str = "auto", buckets: tuple[int, ...] | None = None,
                 capacity_seconds: float | None = None):
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}")
        if attention_backend == "xformers" and xformers_stand_in.active():
            raise ValueError("attention_backend 'xformers' needs an xformers build whose extension "
                             "loads on this torch (stems.xformers_stand_in)")
        if num_threads is not None and num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        # audiocraft's config code reads $USER, unset in some containers.
        os.environ.setdefault("USER", "stemgen")
        import torch
        from audiocraft.modules.transformer import set_efficient_attention_backend

        self.model_name = model
        self.device = resolve_device(device)
        self.mode = resolve_mode(mode, self.device)
        self.precision = resolve_precision(precision, self.device, self.mode)
        if self.mode == "graph" and not self.device.startswith("cuda"):
            raise ValueError("ENGINE_MODE=graph needs a CUDA device")
        set_efficient_attention_backend(attention_backend)
        try:
            self._model = _load_musicgen(_model_source(model), self.device)
        except Exception as exc:  # audiocraft raises assorted types (OSError, KeyError, HF errors)
            raise ModelLoadError(f"cannot load MusicGen model {model!r}: {exc}") from exc
        self._num_threads = num_threads
        lm = self._model.lm
        if self.precision != "float32":
            # The conditioners (T5 overflows in float16) keep float32; audiocraft's autocast
            # casts their output for the prefill, the static step casts it itself.
            lm.to(getattr(torch, self.precision))
            lm.condition_provider.float()
        install_streaming_caches(lm, kv_buffer=kv_buffer, cross_attention_cache=cross_attention_cache)
        #: The static decoder (None in eager mode): stats, capture, cache size.
        self.decoder = None
        #: Seconds spent capturing CUDA graphs at warm-up.
        self.capture_seconds = 0.0
        if self.mode != "eager":
            from stems.decoding import DEFAULT_BUCKETS, StaticDecoder

            window = capacity_seconds or float(self._model.max_duration)
            prefix = window if lm.fuser.fuse2cond.get("prepend") else 0.0  # melody chromagram
            self.decoder = StaticDecoder(
                lm, shape="exact" if self.mode == "exact" else "static",
                graphs=self.mode == "graph", buckets=tuple(buckets or DEFAULT_BUCKETS),
                capacity_steps=int((window + prefix) * self._model.frame_rate) + lm.num_codebooks + 1,
            ).install()
        #: What this engine runs with (reported by the bench and health checks).
        self.settings = {"num_threads": num_threads or torch.get_num_threads(),
                         "attention_backend": attention_backend, "kv_buffer": kv_buffer,
                         "cross_attention_cache": cross_attention_cache, "mode": self.mode,
                         "precision": self.precision,
                         "static_fallback": self.decoder.unsupported if self.decoder else None}
        self._torch = torch
        # MusicGen keeps generation params and the progress callback on the model object.
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz (32000 for every MusicGen)."""
        return int(self._model.sample_rate)

    @property
    def supports_melody(self) -> bool:
        """True for a melody-conditioned MusicGen (a ``self_wav`` chroma conditioner), which
        accepts ``AudioConditioning(kind="chroma")``."""
        return "self_wav" in self._model.lm.condition_provider.conditioners

    @property
    def frame_rate(self) -> float:
        """Decoding steps per second of audio, Hz (the codec's token rate)."""
        return float(self._model.frame_rate)

    @property
    def max_duration_seconds(self) -> float:
        """Longest clip generated in one window; longer ones are extended by audiocraft."""
        return float(self._model.max_duration)

    def generate(self, prompts: list[str], duration_seconds: float, *,
                 sampling: SamplingParams = SamplingParams(), seed: int | None = None,
                 progress: ProgressCallback | None = None,
                 conditioning: AudioConditioning | None = None) -> np.ndarray:
        """Generate one clip per prompt, all in one batched call.

        Args:
            prompts: text descriptions, one per stem (batch size = len(prompts)).
            duration_seconds: length of every clip, seconds (> 0); with a continuation, the length
                of the continuation (the prompt audio is not part of the result).
            sampling: top-k / top-p / temperature / classifier-free guidance coefficient.
            seed: torch RNG seed; None leaves the RNG as it is.
            progress: called with the fraction done (0..1) as tokens are generated.
            conditioning: audio that conditions every row (see AudioConditioning).

        Returns:
            float32 array ``[batch, channels, samples]`` at ``sample_rate`` Hz.

        Raises:
            ValueError: for an empty prompt list, a non-positive duration, or chroma conditioning
                on a model without a chroma conditioner.
            GenerationError: when audiocraft fails.
        """
        if not prompts:
            raise ValueError("prompts must not be empty")
        if duration_seconds <= 0:
            raise ValueError("duration_seconds must be > 0")
        if conditioning is not None and conditioning.kind == "chroma" and not self.supports_melody:
            raise ValueError(f"{self.model_name} is not a melody model: no chroma conditioning")
        prompt_seconds = 0.0
        if conditioning is not None and conditioning.kind == "continuation":
            prompt_seconds = conditioning.audio.shape[-1] / conditioning.sample_rate
        torch = self._torch
        with self._lock:
            model = self._model
            model.set_generation_params(
                use_sampling=True, top_k=sampling.top_k, top_p=sampling.top_p,
                temperature=sampling.temperature, cfg_coef=sampling.cfg_coef,
                duration=prompt_seconds + duration_seconds,
                extend_stride=min(18.0, self.max_duration_seconds / 2),
            )
            if progress is not None:
                # audiocraft calls back once per decoding step, in every extension window, but
                # its counts restart per window and include the window's prompt: progress is the
                # steps decoded so far against the new tokens the clip needs (monotonic, within a
                # few delay steps per window of exact).
                total_tokens = max(1, int(duration_seconds * model.frame_rate))
                steps, reported = [0], [0.0]

                def on_tokens(_done: int, _window_total: int) -> None:
                    steps[0] += 1
                    fraction = min(1.0, steps[0] / total_tokens)
                    if fraction > reported[0]:
                        reported[0] = fraction
                        progress(fraction)

                model.set_custom_progress_callback(on_tokens)
            else:
                model.set_custom_progress_callback(None)
            if self._num_threads is not None and torch.get_num_threads() != self._num_threads:
                # torch's thread count is per OS thread once that thread has run an op, and
                # generate runs on whichever thread calls it (the batcher's): set it here.
                torch.set_num_threads(self._num_threads)
            if seed is not None:
                torch.manual_seed(seed)
                # a melody conditioner separates its audio with demucs.apply_model, whose random
                # time shift comes from Python's random module
                random.seed(seed)
            try:
                with torch.inference_mode():
                    wav = self._call_model(list(prompts), conditioning, progress is not None)
            except Exception as exc:
                raise GenerationError(f"MusicGen generation failed: {exc}") from exc
            if progress is not None and reported[0] < 1.0:
                progress(1.0)  # audiocraft's count is approximate across extension windows
        audio = wav.float().cpu().numpy()
        if prompt_seconds:
            audio = audio[..., int(round(prompt_seconds * self.sample_rate)):]
        return audio

    def _call_model(self, prompts: list[str], conditioning: AudioConditioning | None, progress: bool):
        model, torch = self._model, self._torch
        if conditioning is None:
            return model.generate(prompts, progress=progress)
        audio = torch.from_numpy(np.ascontiguousarray(conditioning.audio, dtype=np.float32))
        batch = audio[None].expand(len(prompts), -1, -1).to(self.device)
        if conditioning.kind == "chroma":
            return model.generate_with_chroma(prompts, batch, conditioning.sample_rate,
                                              progress=progress)
        return model.generate_continuation(batch, conditioning.sample_rate, prompts,
                                           progress=progress)

    def warm_up(self, batch_size: int = 1, duration_seconds: float = 0.5,
                sampling: SamplingParams = SamplingParams()) -> float:
        """Run one short generation so first-request latency excludes lazy initialisation
        (allocator pools, oneDNN/cuBLAS kernel selection for this batch size). In graph mode,
        first capture the decoding step of every bucket up to ``batch_size`` for ``sampling``.

        Returns:
            seconds spent capturing CUDA graphs (0 outside graph mode).
        """
        captured = 0.0
        if self.mode == "graph" and self.decoder.unsupported is None:
            from stems.decoding import Sampler

            sampler = Sampler(True, sampling.temperature, sampling.top_k, sampling.top_p,
                              sampling.cfg_coef)
            from stems.decoding import bucket_for

            largest = bucket_for(batch_size, self.decoder.buckets) or self.decoder.buckets[-1]
            with self._lock, self._torch.inference_mode():
                for bucket in self.decoder.buckets:
                    if bucket <= largest:
                        captured += self.decoder.capture(bucket, True, sampler)
        self.generate(["warm up"] * batch_size, duration_seconds, sampling=sampling)
        self.capture_seconds += captured
        return captured
