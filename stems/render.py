"""From raw MusicGen output to a finished stem file: tempo conform, channels, resampling,
loudness, encoding (WAV, FLAC or MP3; stems.audio.OutputSpec)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from stems.audio import (
    CHANNELS_DUPLICATED,
    DUPLICATED_WARNING,
    OutputSpec,
    decode_audio,
    encode_audio,
    match_channels,
    resample,
)
from stems.loudness import (
    MAX_LIMITING_DB,
    LoudnessReport,
    integrated_loudness,
    normalize_loudness,
    true_peak_dbtp,
)
from stems.plan import bars_for  # noqa: F401 (re-exported: the grid length of a stem)
from stems.tempo import ConformResult, TempoAnalysis, conform_to_bpm


#: Passes of the encode-and-measure loop (finish_stem) before the last resort, a static trim.
_MAX_PASSES = 4
#: Extra headroom taken when a codec pushed the true peak over the ceiling, dB.
_CODEC_MARGIN_DB = 0.05
#: How far the decoded file's loudness may be from the target before the aim is corrected, LU.
_LOUDNESS_TOLERANCE_LU = 0.1


@dataclass(frozen=True)
class RenderedStem:
    """A finished stem: encoded file plus what was measured on the way.

    ``loudness``, ``duration_seconds`` and ``audio`` are measured on the file as decoded again
    (libsndfile): what the backend gets, after resampling, quantisation and (MP3) lossy coding.
    """

    data: bytes                 # the encoded file (WAV, FLAC or MP3)
    content_type: str
    sample_rate: int            # Hz
    channels: int
    duration_seconds: float
    tempo: TempoAnalysis
    loudness: LoudnessReport
    #: the encoded audio as float32 ``[channels, samples]`` (for analysis; not in metadata)
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    output: OutputSpec | None = None       # None: 24-bit WAV at sample_rate (older callers)
    channels_source: str = "model"         # stems.audio.CHANNELS_*
    warnings: tuple[str, ...] = ()

    @property
    def extension(self) -> str:
        """File name extension of ``data`` (wav, flac, mp3)."""
        return self.output.extension if self.output else "wav"

    def metadata(self) -> dict:
        """JSON-serialisable description (used in job results and the callback)."""
        spec = self.output or OutputSpec(sample_rate=self.sample_rate)
        out = {
            **spec.metadata(),
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "channels_source": self.channels_source,
            "duration_seconds": round(self.duration_seconds, 6),
            "tempo": self.tempo.to_dict(),
            "loudness": self.loudness.to_dict(),
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


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
                normalise: bool = True, output: OutputSpec | None = None,
                loop: bool = False) -> RenderedStem:
    """Give conformed ``audio`` the output's channels and rate, normalise its loudness and
    encode it; the targets are checked on the file decoded again.

    Steps: channels (``output.channels``: a mono model's channel duplicated, with a warning, or
    a stereo model's averaged); resampling with soxr VHQ to ``output.sample_rate``, to the grid
    length at that rate (circularly for a loop); loudness normalisation at the output rate;
    encoding. The file is then decoded and measured (BS.1770-4 loudness, x4 true peak): when
    quantisation or the MP3 codec pushed the true peak over the ceiling, the limiter's ceiling
    is lowered by twice the overshoot (plus 0.05 dB; that headroom is limited away, not taken
    from the loudness) and the file made again; when the codec moved
    the loudness more than 0.1 LU off the target, the aim is corrected the same way. At most
    four passes, then a static trim.

    Args:
        audio: float ``[channels, samples]``, already on the grid. sample_rate: Hz.
        tempo: what the conform found (reported with the stem).
        target_lufs: integrated loudness target, LUFS (ITU-R BS.1770).
        max_true_peak_dbtp: true-peak ceiling, dBTP.
        normalise: False keeps the level (only the true-peak ceiling is applied), for a nearly
            silent separated stem that gaining up would turn into loud bleed.
        output: the delivered file; None: 24-bit WAV at ``sample_rate`` with the input's channels.
        loop: the audio is a seamless loop (kept seamless through resampling).
    """
    spec = output or OutputSpec(sample_rate=sample_rate)
    rate = spec.sample_rate
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 1:
        x = x[np.newaxis, :]
    samples = x.shape[1]
    exact = samples / sample_rate
    if abs(tempo.duration_seconds * sample_rate - samples) <= 1.0:
        exact = tempo.duration_seconds  # the grid length, so the output rate's grid is kept too
    length = samples if rate == sample_rate else round(exact * rate)
    if spec.channels is not None and spec.channels < x.shape[0]:
        x, channels_source = match_channels(x, spec.channels)  # fewer channels to resample
        x = resample(x, sample_rate, rate, length=length, loop=loop)
    else:
        x = resample(x, sample_rate, rate, length=length, loop=loop)
        x, channels_source = match_channels(x, spec.channels)
    warnings = (DUPLICATED_WARNING,) if channels_source == CHANNELS_DUPLICATED else ()

    if not normalise:
        # Aim at the stem's own loudness (never above the target): no gain, only the true-peak
        # ceiling still applies.
        measured = integrated_loudness(x, rate)
        if measured is not None:
            target_lufs = min(measured, target_lufs)
    aim, ceiling = target_lufs, max_true_peak_dbtp
    for _ in range(_MAX_PASSES):
        # The headroom taken for the codec is limited away, not taken from the loudness.
        out, report = normalize_loudness(x, rate, target_lufs=aim, max_true_peak_dbtp=ceiling,
                                         max_limiting_db=MAX_LIMITING_DB + max_true_peak_dbtp - ceiling)
        data, decoded, lufs, peak = _encode_and_measure(out, spec)
        over = math.isfinite(peak) and peak > max_true_peak_dbtp
        # Chase the codec's loudness shift only where the normaliser reached its aim (peaky
        # material that the limiter could not bring up stays under the target, as reported).
        off = (normalise and lufs is not None and report.integrated_lufs is not None
               and abs(report.integrated_lufs - aim) < _LOUDNESS_TOLERANCE_LU
               and abs(lufs - target_lufs) > _LOUDNESS_TOLERANCE_LU)
        if not over and not off:
            break
        if over:  # codec overshoot does not shrink in proportion: take twice as much headroom
            ceiling -= 2.0 * (peak - max_true_peak_dbtp) + _CODEC_MARGIN_DB
        if off:
            aim += target_lufs - lufs
    gain_db = report.gain_db
    for _ in range(3):  # last resort: a static trim (both codecs are close to linear in gain)
        if not (math.isfinite(peak) and peak > max_true_peak_dbtp):
            break
        trim = max_true_peak_dbtp - peak - _CODEC_MARGIN_DB
        out = out * np.float32(10.0 ** (trim / 20.0))
        gain_db += trim
        data, decoded, lufs, peak = _encode_and_measure(out, spec)
    channels, decoded_samples = decoded.shape
    return RenderedStem(
        data=data,
        content_type=spec.content_type,
        sample_rate=rate,
        channels=channels,
        duration_seconds=decoded_samples / rate,
        tempo=tempo,
        loudness=LoudnessReport(integrated_lufs=lufs, true_peak_dbtp=peak, gain_db=float(gain_db),
                                limited_db=report.limited_db),
        audio=decoded,
        output=output,
        channels_source=channels_source,
        warnings=warnings,
    )


def _encode_and_measure(audio: np.ndarray, spec: OutputSpec
                        ) -> tuple[bytes, np.ndarray, float | None, float]:
    """Encode, decode again, and measure the decoded file: (bytes, float32 [channels, samples],
    integrated loudness in LUFS or None, true peak in dBTP)."""
    data = encode_audio(audio, spec)
    decoded, rate = decode_audio(data)
    return data, decoded, integrated_loudness(decoded, rate), true_peak_dbtp(decoded, rate)


def render_stem(audio: np.ndarray, sample_rate: int, *, bpm: float, duration_seconds: float,
                beats_per_bar: int = 4, loop: bool = False, target_lufs: float = -14.0,
                max_true_peak_dbtp: float = -1.0, output: OutputSpec | None = None) -> RenderedStem:
    """Conform ``audio`` to ``bpm`` in whole bars, then finish it (``finish_stem``: channels,
    resampling, loudness, encoding as ``output`` says).

    Args:
        audio: float ``[channels, samples]`` as generated.
        sample_rate: Hz.
        bpm: target tempo, BPM.
        duration_seconds: requested length; the stem has the whole number of bars closest to it.
        beats_per_bar: meter numerator (4 for 4/4).
        loop: make the end join the start seamlessly.
        target_lufs: integrated loudness target, LUFS (ITU-R BS.1770).
        max_true_peak_dbtp: true-peak ceiling, dBTP.
        output: the delivered file (stems.audio.OutputSpec); None: 24-bit WAV at
            ``sample_rate`` with the input's channels.

    Raises:
        stems.tempo.TempoError: when the material cannot be conformed.
    """
    conformed = conform_clip(audio, sample_rate, bpm=bpm, duration_seconds=duration_seconds,
                             beats_per_bar=beats_per_bar, loop=loop)
    return finish_stem(conformed.audio, sample_rate, conformed.analysis, target_lufs=target_lufs,
                       max_true_peak_dbtp=max_true_peak_dbtp, output=output, loop=loop)


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
