"""Source separation of a mix into stems with Demucs.

Wraps Hybrid Transformer Demucs (Rouard, Massa, Défossez 2023, "Hybrid Transformers for Music
Source Separation", ICASSP; https://github.com/facebookresearch/demucs) through demucs's own
``pretrained.get_model`` and ``apply.apply_model``, with the normalisation ``demucs.separate``
applies around it. The model is loaded once and reused, like the MusicGen engine.

Models load by name ("htdemucs_6s", "htdemucs") from ``$TORCH_HOME/hub/checkpoints``, downloading
when missing; offline, ``stems.checkpoint.write_tiny_demucs`` puts a tiny random-weight model
there. (demucs 4.0.1's ``repo=<dir>`` local repositories load with ``torch.load``'s default, which
refuses demucs's packages since torch 2.6, so they are not offered.)
"""

from __future__ import annotations

import math
import threading
from typing import Iterable

import numpy as np

DEFAULT_MODEL = "htdemucs_6s"

#: Floor of ``stem_energy_db``: a silent stem (or a stem of a silent mix) reads as this, in dB.
ENERGY_FLOOR_DB = -120.0


#: SEPARATION_MODEL for a random-weight htdemucs_6s (offline runs, tests).
TINY = "tiny"


def _load_tiny():
    """``pretrained.get_model("htdemucs_6s")`` on a tiny random-weight file in the cache dir."""
    from demucs import pretrained

    from stems.checkpoint import cache_dir, demucs_checkpoint_path, torch_home_environment, write_tiny_demucs

    home = cache_dir() / "tiny-demucs"
    if not demucs_checkpoint_path(home, "htdemucs_6s").is_file():
        write_tiny_demucs(home, "htdemucs_6s")  # atomic: a concurrent writer's file is the same
    with torch_home_environment(home):
        return pretrained.get_model("htdemucs_6s")


class SeparationError(RuntimeError):
    """Demucs could not be loaded or could not separate, or a stem is not one of its sources."""


class Separator:
    """One loaded Demucs model (default "htdemucs_6s"), reused (loaded once per worker like MusicGen).

    Args:
        model: a Demucs model name ("htdemucs_6s": drums, bass, other, vocals, guitar, piano;
            "htdemucs": the first four), or "tiny": a random-weight htdemucs_6s written on first
            use (stems.checkpoint.write_tiny_demucs) and loaded through the same code, for
            offline runs and tests.
        device: torch device the model runs on ("cpu", "cuda", "cuda:N").
        shifts: random time shifts averaged per segment (demucs's shift trick; 0 = off and
            deterministic, each shift costs one more pass).
        overlap: overlap of consecutive segments, as a fraction of a segment (0 ≤ overlap < 1).
        split: process the audio in segments of the model's training length (memory bounded);
            False runs the whole clip at once.
        segment: segment length in seconds when ``split``; None takes the model's (7.8 s for the
            released HTDemucs, also their maximum).
        num_threads: intra-op threads torch uses while separating; None keeps torch's default.

    Attributes:
        sources: the model's source names, in its output order.
        samplerate: the model's sample rate, Hz (44100 for the released models).

    Raises:
        SeparationError: when the model cannot be loaded (unknown name, file missing and no
            network, unreadable file).
        ValueError: for out-of-range settings.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "cpu", *, shifts: int = 0,
                 overlap: float = 0.25, split: bool = True, segment: float | None = None,
                 num_threads: int | None = None):
        if shifts < 0:
            raise ValueError("shifts must be >= 0")
        if not 0.0 <= overlap < 1.0:
            raise ValueError("overlap must be in [0, 1)")
        if segment is not None and segment <= 0:
            raise ValueError("segment must be > 0 seconds")
        if num_threads is not None and num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        import torch
        from demucs import pretrained
        from demucs.apply import BagOfModels

        try:
            loaded = _load_tiny() if model == TINY else pretrained.get_model(model)
        except (Exception, SystemExit) as exc:
            # demucs raises ModelLoadingError for an unknown name, urllib errors when the file is
            # missing offline, and exits the process (dora's fatal) when diffq is missing.
            raise SeparationError(f"cannot load Demucs model {model!r}: {exc!r}") from exc
        parts = loaded.models if isinstance(loaded, BagOfModels) else [loaded]
        max_segment = min((float(p.segment) for p in parts if hasattr(p, "segment")),
                          default=math.inf)
        if segment is not None and segment > max_segment:
            # HTDemucs pads shorter segments to its training length; longer ones it never saw.
            raise ValueError(f"segment {segment} s exceeds {model!r}'s maximum of {max_segment} s")
        try:
            self._model = loaded.to(device).eval()
        except (RuntimeError, AssertionError) as exc:  # unknown device, no CUDA build
            raise SeparationError(f"cannot move Demucs model {model!r} to {device!r}: {exc}") from exc
        self.model_name = model
        self.device = device
        self.sources: tuple[str, ...] = tuple(loaded.sources)
        self.samplerate: int = int(loaded.samplerate)
        self._audio_channels = int(loaded.audio_channels)
        self._shifts, self._overlap, self._split, self._segment = shifts, overlap, split, segment
        self._num_threads = num_threads
        self._torch = torch
        # apply_model moves bag members between devices and set_num_threads is per OS thread.
        self._lock = threading.Lock()

    def separate(self, audio: np.ndarray, sample_rate: int,
                 stems: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Separate a mix into the requested stems.

        The mix is resampled (soxr, high quality) to the model's rate and made stereo as Demucs
        expects (mono is duplicated), normalised by the mean and standard deviation of its mono
        downmix (as ``demucs.separate`` does), separated, and each stem brought back to
        ``sample_rate``, the input's channel count (stereo stems are averaged for a mono input)
        and the input's length.

        Args:
            audio: float ``[channels, samples]`` (1 or 2 channels) at ``sample_rate``.
            sample_rate: Hz of ``audio`` and of the returned stems.
            stems: model source names to return (e.g. "guitar", "bass", "drums"; one name may be
                given as a string); None returns every source.

        Returns:
            ``{stem: float32 [channels, samples]}`` in the order asked, each with the input's
            channels and samples.

        Raises:
            SeparationError: for a stem that is not one of the model's sources (the message names
                the stem and the sources), or when Demucs fails.
            ValueError: for a malformed input (shape, empty, non-finite, sample rate ≤ 0).
        """
        if isinstance(stems, str):
            stems = [stems]
        wanted = list(dict.fromkeys(self.sources if stems is None else stems))
        for stem in wanted:
            if stem not in self.sources:
                raise SeparationError(f"stem {stem!r} is not a source of Demucs model "
                                      f"{self.model_name!r} (sources: {', '.join(self.sources)})")
        audio = np.asarray(audio)
        if audio.ndim != 2 or audio.shape[0] not in (1, 2):
            raise ValueError(f"audio must be [channels, samples] with 1 or 2 channels, "
                             f"got shape {audio.shape}")
        if audio.shape[1] == 0:
            raise ValueError("audio is empty")
        if sample_rate <= 0:
            raise ValueError("sample_rate must be > 0")
        if not np.all(np.isfinite(audio)):
            raise ValueError("audio holds NaN or infinite samples")
        channels, length = audio.shape
        mix = _resample(audio.astype(np.float32, copy=False), sample_rate, self.samplerate)
        torch = self._torch
        from demucs.apply import apply_model
        from demucs.audio import convert_audio_channels

        with self._lock:
            if self._num_threads is not None and torch.get_num_threads() != self._num_threads:
                torch.set_num_threads(self._num_threads)
            try:
                with torch.inference_mode():
                    wav = convert_audio_channels(torch.from_numpy(mix), self._audio_channels)
                    ref = wav.mean(0)
                    mean, std = ref.mean(), ref.std()
                    # demucs.separate divides by std alone: a silent mix would give NaN stems.
                    scale = std + 1e-8
                    wav = (wav - mean) / scale
                    out = apply_model(self._model, wav[None], shifts=self._shifts,
                                      split=self._split, overlap=self._overlap, progress=False,
                                      device=self.device, segment=self._segment)[0]
                    out = out * scale + mean
                    picked = out[[self.sources.index(s) for s in wanted]]
                    picked = convert_audio_channels(picked, channels).float().cpu().numpy()
            except Exception as exc:
                raise SeparationError(f"Demucs separation failed: {exc}") from exc
        return {stem: _fit_length(_resample(picked[i], self.samplerate, sample_rate), length)
                for i, stem in enumerate(wanted)}


def stem_energy_db(audio: np.ndarray, reference: np.ndarray) -> float:
    """Level of a separated stem relative to the mix it came from, in dB.

    ``10 log10(mean(audio²) / mean(reference²))``: mean-square energy over all channels and
    samples, so the two may differ in length or channel count. 0 dB: as loud as the mix;
    around -30 dB or lower: nearly silent. Floored at ``ENERGY_FLOOR_DB`` (a silent stem, or any
    stem of a silent mix).

    Args:
        audio: the stem, float ``[channels, samples]``.
        reference: the mix, float ``[channels, samples]``.
    """
    stem_energy = float(np.mean(np.square(np.asarray(audio, dtype=np.float64))))
    mix_energy = float(np.mean(np.square(np.asarray(reference, dtype=np.float64))))
    if stem_energy <= 0.0 or mix_energy <= 0.0 or not math.isfinite(stem_energy / mix_energy):
        return ENERGY_FLOOR_DB
    return max(ENERGY_FLOOR_DB, 10.0 * math.log10(stem_energy / mix_energy))


def _resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 ``[channels, samples]`` from ``from_rate`` to ``to_rate`` Hz with soxr (HQ)."""
    if from_rate == to_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    import soxr

    # soxr takes [samples, channels].
    out = soxr.resample(np.ascontiguousarray(audio.T, dtype=np.float32), from_rate, to_rate)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad ``[channels, samples]`` to ``length`` samples (resampling rounds)."""
    if audio.shape[1] >= length:
        return np.ascontiguousarray(audio[:, :length])
    return np.pad(audio, ((0, 0), (0, length - audio.shape[1])))
