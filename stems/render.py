"""From raw MusicGen output to a finished stem file: tempo conform, loudness, WAV encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stems.audio import WAV_CONTENT_TYPE, encode_wav
from stems.loudness import LoudnessReport, integrated_loudness, normalize_loudness
from stems.plan import bars_for  # noqa: F401 (re-exported: the grid length of a stem)
from stems.tempo import ConformResult, TempoAnalysis, conform_to_bpm


@dataclass(frozen=True)
class RenderedStem:
    """A finished stem: encoded file plus what was measured on the way."""

    data: bytes                 # WAV file bytes
    content_type: str
    sample_rate: int            # Hz
    channels: int
    duration_seconds: float
    tempo: TempoAnalysis
    loudness: LoudnessReport
    #: the encoded audio as float32 ``[channels, samples]`` (for analysis; not in metadata)
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)

    def metadata(self) -> dict:
        """JSON-serialisable description (used in job results and the callback)."""
        return {
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "duration_seconds": round(self.duration_seconds, 6),
            "format": "wav",
            "tempo": self.tempo.to_dict(),
            "loudness": self.loudness.to_dict(),
        }


def conform_clip(audio: np.ndarray, sample_rate: int, *, bpm: float, duration_seconds: float,
                 beats_per_bar: int = 4, loop: bool = False) -> ConformResult:
    """Conform generated ``audio`` to ``bpm`` in the whole number of bars closest to
    ``duration_seconds`` (stems.tempo.conform_to_bpm).

    Args:
        audio: float ``[channels, samples]`` as generated. sample_rate: Hz. bpm: target, BPM.
        duration_seconds: requested length, seconds. beats_per_bar: 4 for 4/4.
        loop: make the end join the start seamlessly.

    Raises:
        stems.tempo.TempoError: when the material cannot be conformed.
    """
    bars = bars_for(duration_seconds, bpm, beats_per_bar)
    return conform_to_bpm(audio, sample_rate, bpm, bars=bars, loop=loop, beats_per_bar=beats_per_bar)


def finish_stem(audio: np.ndarray, sample_rate: int, tempo: TempoAnalysis, *,
                target_lufs: float = -14.0, max_true_peak_dbtp: float = -1.0,
                normalise: bool = True) -> RenderedStem:
    """Normalise the loudness of conformed ``audio`` and encode it as WAV.

    Args:
        audio: float ``[channels, samples]``, already on the grid. sample_rate: Hz.
        tempo: what the conform found (reported with the stem).
        target_lufs: integrated loudness target, LUFS (ITU-R BS.1770).
        max_true_peak_dbtp: true-peak ceiling, dBTP.
        normalise: False keeps the level (only the true-peak ceiling is applied), for a nearly
            silent separated stem that gaining up would turn into loud bleed.
    """
    if not normalise:
        # Aim at the stem's own loudness (never above the target): no gain, only the true-peak
        # ceiling still applies.
        measured = integrated_loudness(audio, sample_rate)
        if measured is not None:
            target_lufs = min(measured, target_lufs)
    out, loudness = normalize_loudness(audio, sample_rate, target_lufs=target_lufs,
                                       max_true_peak_dbtp=max_true_peak_dbtp)
    channels, samples = out.shape
    return RenderedStem(
        data=encode_wav(out, sample_rate),
        content_type=WAV_CONTENT_TYPE,
        sample_rate=sample_rate,
        channels=channels,
        duration_seconds=samples / sample_rate,
        tempo=tempo,
        loudness=loudness,
        audio=out,
    )


def render_stem(audio: np.ndarray, sample_rate: int, *, bpm: float, duration_seconds: float,
                beats_per_bar: int = 4, loop: bool = False, target_lufs: float = -14.0,
                max_true_peak_dbtp: float = -1.0) -> RenderedStem:
    """Conform ``audio`` to ``bpm`` in whole bars, normalise its loudness, encode it as WAV.

    Args:
        audio: float ``[channels, samples]`` as generated.
        sample_rate: Hz.
        bpm: target tempo, BPM.
        duration_seconds: requested length; the stem has the whole number of bars closest to it.
        beats_per_bar: meter numerator (4 for 4/4).
        loop: make the end join the start seamlessly.
        target_lufs: integrated loudness target, LUFS (ITU-R BS.1770).
        max_true_peak_dbtp: true-peak ceiling, dBTP.

    Raises:
        stems.tempo.TempoError: when the material cannot be conformed.
    """
    conformed = conform_clip(audio, sample_rate, bpm=bpm, duration_seconds=duration_seconds,
                             beats_per_bar=beats_per_bar, loop=loop)
    return finish_stem(conformed.audio, sample_rate, conformed.analysis, target_lufs=target_lufs,
                       max_true_peak_dbtp=max_true_peak_dbtp)


def warm_up(sample_rate: int = 32000) -> RenderedStem:
    """Render one synthetic stem so a worker's first real stem does not pay for lazy set-up.

    librosa loads its submodules on first use (lazy_loader) and its numba functions are compiled
    on first use, then cached on disk (``cache=True``; ``NUMBA_CACHE_DIR``). On the 2-core box, the
    first stem of a process took 3.3-4.4 s with numba's cache on disk and 23-34 s without it (the
    first process after an install); the next stem 0.2 s. ``make install`` and the Docker image
    run this once so that the cache exists before a worker starts. The clip is a 2-bar click track
    played at 118 BPM and conformed to 120 BPM, so the beat tracker, the variable-ratio stretch
    and the loudness path all run; it compiles every numba signature that mono and stereo stems
    use (tests/stems/test_render.py).

    Args:
        sample_rate: Hz, the rate the worker's model generates at.

    Returns:
        The rendered synthetic stem (4 s; its tempo analysis says which path ran).
    """
    source_bpm, seconds = 118.0, 6.0
    samples = int(seconds * sample_rate)
    audio = np.zeros((1, samples), dtype=np.float32)
    click = int(0.02 * sample_rate)
    envelope = np.exp(-np.linspace(0.0, 8.0, click, dtype=np.float32))
    tone = np.sin(2 * np.pi * 1000.0 * np.arange(click, dtype=np.float32) / sample_rate)
    for beat in range(int(seconds * source_bpm / 60.0)):
        start = int(beat * 60.0 / source_bpm * sample_rate)
        n = min(click, samples - start)
        audio[0, start: start + n] += (0.8 if beat % 4 == 0 else 0.4) * envelope[:n] * tone[:n]
    return render_stem(audio, sample_rate, bpm=120.0, duration_seconds=4.0)
