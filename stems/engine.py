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
from stems.audiocraft_patches import install_streaming_caches
from stems.precision import PRECISIONS, conflict, resolve_mode, resolve_precision
from stems.sampling import SamplingParams

log = logging.getLogger(__name__)

TINY = "tiny"


class ModelLoadError(RuntimeError):
    """The MusicGen model could not be loaded (unknown id, missing files, no network for the hub)."""


class GenerationError(RuntimeError):
    """MusicGen failed while generating."""


class _SelfCheckFailed(Exception):
    """The start self-check could not compare (its reason goes to the result)."""


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
__all__ = ["PRECISIONS", "SamplingParams", "StemEngine", "install_streaming_caches",
           "on_short_lived_thread", "resolve_mode", "resolve_precision"]


def on_short_lived_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on a thread that ends when it returns; its result, or its
    exception re-raised here.

    GNU OpenMP (torch's CPU threads) keeps one thread pool per thread that runs parallel work, and
    a pool stays while its thread lives. A model loaded and warmed up on one long-lived thread (a
    worker's main thread) and decoded on another (the batcher's) leaves two pools on the CPU, and
    every decoding step ran about 1.5× slower on 2 cores (docs/benchmarks.md#precision). Loading on
    a thread that ends leaves the generating thread's pool the only one.
    """
    import threading

    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="stemgen-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


class StemEngine:
    """One loaded MusicGen, shared by every stem a worker process generates.

    Speed settings (only ``precision`` changes the model's arithmetic; see stems.precision):

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
        precision: the language model's precision layout (stems.precision): "float32",
            "float16"/"bfloat16" (audiocraft's CUDA layout: half-precision layers under autocast,
            float32 embeddings, norms, output linears, positions and residual stream), "int8"
            (CPU: the bfloat16 layout with int8 weight-only layers), "auto".
        buckets: batch-size buckets of the static and graph modes.
        capacity_seconds: longest window a static cache holds (default: the model's window).

    Raises:
        ModelLoadError: when audiocraft cannot load the model.
        ValueError: for an unknown attention backend, mode or precision, a combination
            ``stems.precision.conflict`` refuses (the message names the variable), or a
            non-positive thread count.
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
        reason = conflict(mode, precision, self.device, attention_backend)
        self.mode = resolve_mode(mode, self.device)
        self.precision = resolve_precision(precision, self.device)
        reason = reason or conflict(self.mode, self.precision, self.device, attention_backend)
        if reason:
            raise ValueError(reason)
        set_efficient_attention_backend(attention_backend)
        try:
            self._model = _load_musicgen(_model_source(model), self.device)
        except Exception as exc:  # audiocraft raises assorted types (OSError, KeyError, HF errors)
            raise ModelLoadError(f"cannot load MusicGen model {model!r}: {exc}") from exc
        self._num_threads = num_threads
        lm = self._model.lm
        from stems.precision import apply_layout, float32_attention

        apply_layout(self._model, self.precision)
        f32_attention = float32_attention(self.precision, self.device)
        install_streaming_caches(lm, kv_buffer=kv_buffer, cross_attention_cache=cross_attention_cache,
                                 float32_attention=f32_attention)
        #: The static decoder (None in eager mode): stats, capture, cache size.
        self.decoder = None
        #: Seconds spent capturing CUDA graphs at warm-up.
        self.capture_seconds = 0.0
        #: The start's self-check (``self_check``), None until it ran.
        self.self_check_result: dict | None = None
        if self.mode != "eager":
            from stems.decoding import DEFAULT_BUCKETS, StaticDecoder

            window = capacity_seconds or float(self._model.max_duration)
            prefix = window if lm.fuser.fuse2cond.get("prepend") else 0.0  # melody chromagram
            self.decoder = StaticDecoder(
                lm, shape="exact" if self.mode == "exact" else "static",
                graphs=self.mode == "graph", buckets=tuple(buckets or DEFAULT_BUCKETS),
                capacity_steps=int((window + prefix) * self._model.frame_rate) + lm.num_codebooks + 1,
                precision=self.precision,
            ).install()
        #: What this engine runs with (reported by the bench and health checks).
        self.settings = {"num_threads": num_threads or torch.get_num_threads(),
                         "attention_backend": attention_backend, "kv_buffer": kv_buffer,
                         "cross_attention_cache": cross_attention_cache, "mode": self.mode,
                         "precision": self.precision, "float32_attention": f32_attention,
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
        first check the static cache's budget and capture the whole graph set for every bucket
        up to ``batch_size`` (stems.decoding.StaticDecoder.capture).

        Returns:
            seconds spent capturing CUDA graphs (0 outside graph mode).

        Raises:
            stems.decoding.DecodingBudgetError: the cache does not fit (graph mode).
            GenerationError: the warm-up generation failed.
        """
        captured = 0.0
        if self.mode == "graph" and self.decoder.unsupported is None:
            from stems.decoding import check_budget

            check_budget(self.decoder)
            captured = self.decoder.capture(largest=batch_size)
        self.generate(["warm up"] * batch_size, duration_seconds, sampling=sampling)
        self.capture_seconds += captured
        return captured

    def self_check(self, duration_seconds: float = 0.5, seed: int = 0) -> dict:
        """Check the decoding path against its references with one short seeded generation of
        two rows: in graph mode the replayed graphs must give bitwise the tokens of the same
        step run uncaptured; the step's logits must be within ``stems.decoding.TOLERANCE`` of
        audiocraft's eager forward on the same precision (``teacher_forced``). On a failure the
        decoder is turned off (every generation goes through audiocraft's generate) and the
        result says why.

        Returns:
            ``{"passed", "reason", "relative_error", "token_agreement", "tolerance"}``
            (``reason`` None when passed; eager mode passes with nothing to check).
        """
        from stems.decoding import TOLERANCE, compare, teacher_forced

        result = {"passed": True, "reason": None, "relative_error": None,
                  "token_agreement": None, "tolerance": TOLERANCE[self.precision]}
        decoder = self.decoder
        if decoder is None or decoder.unsupported is not None:
            self.self_check_result = result
            return result
        torch = self._torch
        prompts = ["self check, guitar", "self check, drums"][:decoder.buckets[-1]]
        model = self._model

        def tokens():
            torch.manual_seed(seed)
            with torch.inference_mode(), model.autocast:
                _, codes = model.generate(prompts, return_tokens=True)
            return codes

        with self._lock:
            model.set_generation_params(duration=duration_seconds, use_sampling=True, top_k=250)
            model.set_custom_progress_callback(None)
            decoder.recorded = []
            try:
                first = tokens()
                if not decoder.recorded:  # the generation fell back to audiocraft's generate
                    raise _SelfCheckFailed(f"the static step did not run: {decoder.stats.last_fallback}")
                static, eager = teacher_forced(decoder)
                if decoder.graphs:
                    decoder.graphs = False
                    try:
                        uncaptured = tokens()
                    finally:
                        decoder.graphs = True
                    if not torch.equal(first, uncaptured):
                        result["reason"] = "CUDA-graph replay differs from the uncaptured static step"
            except _SelfCheckFailed as exc:
                result["reason"] = str(exc)
            finally:
                decoder.recorded = None
        if result["reason"] is None:
            result.update(compare(static, eager))
        if result["reason"] is None and not result["relative_error"] <= result["tolerance"]:
            result["reason"] = (f"static step logits {result['relative_error']:.2e} from audiocraft's "
                                f"eager forward, above the tolerance {result['tolerance']:.0e}")
        if result["reason"] is not None:
            result["passed"] = False
            decoder.unsupported = f"self-check failed: {result['reason']}"
            self.settings["static_fallback"] = decoder.unsupported
            log.error("decoding self-check failed, serving audiocraft's eager generate: %s",
                      result["reason"])
        self.self_check_result = result
        return result
