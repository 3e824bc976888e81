"""The MusicGen engine: loads a model once and generates batches of stems.

Wraps audiocraft's ``MusicGen`` (Copet et al. 2023). Loading goes through
``MusicGen.get_pretrained(name_or_dir)``, the same call for a hub id (``facebook/musicgen-small``), a
local checkpoint directory, or ``tiny`` (a random-weight checkpoint written by stems.checkpoint).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

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


def resolve_device(device: str = "auto") -> str:
    """Map "auto" to "cuda" when a CUDA device is visible, else "cpu"; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tiny_checkpoint_dir() -> Path:
    """Directory of the shared tiny checkpoint, written once (atomically) on first use."""
    from stems.checkpoint import is_checkpoint_dir, write_checkpoint

    target = Path(os.environ.get("STEMGEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "stemgen") / "tiny-musicgen"
    if not is_checkpoint_dir(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
        write_checkpoint(staging, "tiny", seed=0)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its checkpoint is identical
            pass
    return target


def _model_source(name: str) -> str:
    if name == TINY:
        return str(tiny_checkpoint_dir())
    return name


class StemEngine:
    """One loaded MusicGen, shared by every stem a worker process generates.

    Args:
        model: hub id, local checkpoint directory, or "tiny".
        device: "auto", "cpu", "cuda" or "cuda:N".

    Raises:
        ModelLoadError: when audiocraft cannot load the model.
    """

    def __init__(self, model: str, device: str = "auto"):
        # audiocraft's config code reads $USER, unset in some containers.
        os.environ.setdefault("USER", "stemgen")
        import torch
        from audiocraft.models import MusicGen

        self.model_name = model
        self.device = resolve_device(device)
        try:
            self._model = MusicGen.get_pretrained(_model_source(model), device=self.device)
        except Exception as exc:  # audiocraft raises assorted types (OSError, KeyError, HF errors)
            raise ModelLoadError(f"cannot load MusicGen model {model!r}: {exc}") from exc
        self._torch = torch
        # MusicGen keeps generation params and the progress callback on the model object.
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz (32000 for every MusicGen)."""
        return int(self._model.sample_rate)

    @property
    def max_duration_seconds(self) -> float:
        """Longest clip generated in one window; longer ones are extended by audiocraft."""
        return float(self._model.max_duration)

    def generate(self, prompts: list[str], duration_seconds: float, *,
                 sampling: SamplingParams = SamplingParams(), seed: int | None = None,
                 progress: ProgressCallback | None = None) -> np.ndarray:
        """Generate one clip per prompt, all in one batched call.

        Args:
            prompts: text descriptions, one per stem (batch size = len(prompts)).
            duration_seconds: length of every clip, seconds (> 0).
            sampling: top-k / top-p / temperature / classifier-free guidance coefficient.
            seed: torch RNG seed; None leaves the RNG as it is.
            progress: called with the fraction done (0..1) as tokens are generated.

        Returns:
            float32 array ``[batch, channels, samples]`` at ``sample_rate`` Hz.

        Raises:
            ValueError: for an empty prompt list or a non-positive duration.
            GenerationError: when audiocraft fails.
        """
        if not prompts:
            raise ValueError("prompts must not be empty")
        if duration_seconds <= 0:
            raise ValueError("duration_seconds must be > 0")
        torch = self._torch
        with self._lock:
            model = self._model
            model.set_generation_params(
                use_sampling=True, top_k=sampling.top_k, top_p=sampling.top_p,
                temperature=sampling.temperature, cfg_coef=sampling.cfg_coef,
                duration=duration_seconds,
                extend_stride=min(18.0, self.max_duration_seconds / 2),
            )
            if progress is not None:
                # audiocraft reports tokens done across extension windows but the total of the
                # current window only, so the fraction is taken against the whole clip's tokens.
                # Overlapping windows can make the count step back: report the running maximum.
                total_tokens = max(1, int(duration_seconds * model.frame_rate))
                reported = [0.0]

                def on_tokens(done: int, _window_total: int) -> None:
                    fraction = min(1.0, done / total_tokens)
                    if fraction > reported[0]:
                        reported[0] = fraction
                        progress(fraction)

                model.set_custom_progress_callback(on_tokens)
            else:
                model.set_custom_progress_callback(None)
            if seed is not None:
                torch.manual_seed(seed)
            try:
                with torch.inference_mode():
                    wav = model.generate(list(prompts), progress=progress is not None)
            except Exception as exc:
                raise GenerationError(f"MusicGen generation failed: {exc}") from exc
            if progress is not None and reported[0] < 1.0:
                progress(1.0)  # audiocraft's count is approximate across extension windows
        return wav.float().cpu().numpy()

    def warm_up(self) -> None:
        """Run one short generation so first-request latency excludes lazy initialisation."""
        self.generate(["warm up"], 0.5)
