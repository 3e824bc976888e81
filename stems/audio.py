"""Audio encoding and decoding (soundfile / libsndfile), resampling (soxr) and the delivered
file's format (``OutputSpec``: WAV, FLAC or MP3 at 32, 44.1 or 48 kHz)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

WAV_SUBTYPE = "PCM_24"
WAV_CONTENT_TYPE = "audio/wav"

FORMATS = ("wav", "flac", "mp3")
SAMPLE_RATES = (32000, 44100, 48000)
BIT_DEPTHS = (16, 24)
CHANNELS = (1, 2)
#: MPEG-1 Layer III constant bitrates offered, kbps.
MP3_BITRATES = (128, 160, 192, 224, 256, 320)
CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}
DEFAULT_FORMAT, DEFAULT_SAMPLE_RATE, DEFAULT_BIT_DEPTH, DEFAULT_MP3_BITRATE = "wav", 48000, 24, 320
_PCM_SUBTYPES = {16: "PCM_16", 24: "PCM_24"}
_SF_FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3"}
#: channels_source: the model's own channels, a mono model's channel copied to both, or a stereo
#: model's channels averaged.
CHANNELS_MODEL, CHANNELS_DUPLICATED, CHANNELS_DOWNMIXED = "model", "duplicated", "downmixed"
#: The stem result's warning when a mono model's audio is delivered as two channels.
DUPLICATED_WARNING = ("mono model: the two channels are the same (the worker's model generates "
                      "mono; a musicgen-stereo-* model generates stereo)")


@dataclass(frozen=True)
class OutputSpec:
    """The delivered file: ``parameters.output`` of a request (api.schemas.OutputFormat).

    Attributes:
        format: "wav", "flac" or "mp3".
        sample_rate: Hz; a request offers SAMPLE_RATES (MP3: only those, the MPEG-1 rates);
            library callers may keep the model's own rate for WAV/FLAC.
        bit_depth: 16 or 24 (PCM) for wav/flac; None for mp3.
        channels: 1 or 2; None keeps the model's own (mono, or stereo from a stereo model).
        bitrate_kbps: mp3 only, constant bitrate, one of MP3_BITRATES; None otherwise.
    """

    format: str = DEFAULT_FORMAT
    sample_rate: int = DEFAULT_SAMPLE_RATE
    bit_depth: int | None = DEFAULT_BIT_DEPTH
    channels: int | None = None
    bitrate_kbps: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) \
                or self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {self.sample_rate!r}")
        if self.channels is not None and self.channels not in CHANNELS:
            raise ValueError(f"channels must be 1 or 2, got {self.channels!r}")
        if self.format == "mp3":
            if self.sample_rate not in SAMPLE_RATES:  # MPEG-1 Layer III rates
                raise ValueError(f"mp3 sample_rate must be one of {SAMPLE_RATES}, got {self.sample_rate!r}")
            if self.bit_depth is not None:
                raise ValueError("bit_depth does not apply to mp3")
            if self.bitrate_kbps not in MP3_BITRATES:
                raise ValueError(f"bitrate_kbps must be one of {MP3_BITRATES}, got {self.bitrate_kbps!r}")
        else:
            if self.bit_depth not in BIT_DEPTHS:
                raise ValueError(f"bit_depth must be 16 or 24, got {self.bit_depth!r}")
            if self.bitrate_kbps is not None:
                raise ValueError(f"bitrate_kbps applies to mp3 only, not {self.format}")

    @classmethod
    def from_dict(cls, value: dict | None) -> "OutputSpec":
        """The spec of a request's ``parameters.output`` (None or missing keys: the defaults,
        WAV 24-bit 48 kHz with the model's channels; mp3: 320 kbps).

        Raises:
            ValueError: an unknown key or value.
        """
        value = dict(value or {})
        unknown = set(value) - {"format", "sample_rate", "bit_depth", "channels", "bitrate_kbps"}
        if unknown:
            raise ValueError(f"unknown output keys: {sorted(unknown)}")
        fmt = value.get("format") or DEFAULT_FORMAT
        bit_depth, bitrate = value.get("bit_depth"), value.get("bitrate_kbps")
        if fmt == "mp3":
            bitrate = DEFAULT_MP3_BITRATE if bitrate is None else bitrate
        elif bit_depth is None:
            bit_depth = DEFAULT_BIT_DEPTH
        return cls(format=fmt, sample_rate=int(value.get("sample_rate") or DEFAULT_SAMPLE_RATE),
                   bit_depth=bit_depth, channels=value.get("channels"), bitrate_kbps=bitrate)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def extension(self) -> str:
        """File name extension (and the blob name's), without the dot."""
        return self.format

    def metadata(self) -> dict:
        """The stem result's format fields: format, sample_rate, content_type, and bit_depth
        (wav, flac) or bitrate_kbps (mp3)."""
        out = {"format": self.format, "sample_rate": self.sample_rate,
               "content_type": self.content_type}
        if self.format == "mp3":
            out["bitrate_kbps"] = self.bitrate_kbps
        else:
            out["bit_depth"] = self.bit_depth
        return out


def _frames(audio: np.ndarray) -> np.ndarray:
    data = np.asarray(audio, dtype=np.float32)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2:
        raise ValueError(f"audio must be [channels, samples], got shape {data.shape}")
    return data.T  # soundfile and soxr take [samples, channels]


def encode_wav(audio: np.ndarray, sample_rate: int, *, subtype: str = WAV_SUBTYPE) -> bytes:
    """Encode ``audio`` as a RIFF WAV file.

    Args:
        audio: float samples in [-1, 1], shape ``[channels, samples]`` (or ``[samples]`` for mono).
        sample_rate: Hz.
        subtype: libsndfile subtype, 24-bit PCM by default.

    Returns:
        The file's bytes.
    """
    buffer = io.BytesIO()
    sf.write(buffer, _frames(audio), sample_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _mp3_compression_level(bitrate_kbps: int) -> float:
    # libsndfile (mpeg_l3_encode.c) picks an MPEG-1 constant bitrate of
    # 320 - int(level * 288) kbps; the half step keeps int() from truncating to the next one down.
    return (320 - bitrate_kbps + 0.5) / 288.0


def encode_audio(audio: np.ndarray, spec: OutputSpec) -> bytes:
    """Encode ``audio`` (float ``[channels, samples]`` in [-1, 1], already at
    ``spec.sample_rate``) as ``spec`` says, in process with libsndfile: WAV or FLAC as 16- or
    24-bit PCM; MP3 with LAME at a constant bitrate, with a LAME/Info tag that carries the
    encoder delay and padding (gapless decoders, libsndfile's mpg123 among them, return exactly
    the samples encoded).

    Returns:
        The file's bytes.
    """
    buffer = io.BytesIO()
    frames = _frames(audio)
    if spec.format == "mp3":
        sf.write(buffer, frames, spec.sample_rate, format="MP3", subtype="MPEG_LAYER_III",
                 compression_level=_mp3_compression_level(spec.bitrate_kbps),
                 bitrate_mode="CONSTANT")
    else:
        sf.write(buffer, frames, spec.sample_rate, format=_SF_FORMATS[spec.format],
                 subtype=_PCM_SUBTYPES[spec.bit_depth])
    return buffer.getvalue()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode any libsndfile-readable file (WAV, FLAC, MP3, ...) into float32
    ``[channels, samples]`` and its rate in Hz.

    Raises:
        soundfile.LibsndfileError: when the bytes are not a readable audio file.
    """
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.T.copy(), int(sample_rate)


def match_channels(audio: np.ndarray, channels: int | None) -> tuple[np.ndarray, str]:
    """``audio`` ``[channels, samples]`` with ``channels`` channels (None: as it is), and where
    they came from: CHANNELS_MODEL, CHANNELS_DUPLICATED (mono copied to both) or
    CHANNELS_DOWNMIXED (stereo averaged to mono)."""
    have = audio.shape[0]
    if channels is None or channels == have:
        return audio, CHANNELS_MODEL
    if have == 1 and channels == 2:
        return np.repeat(audio, 2, axis=0), CHANNELS_DUPLICATED
    if channels == 1:
        return audio.mean(axis=0, keepdims=True), CHANNELS_DOWNMIXED
    raise ValueError(f"cannot make {channels} channels from {have}")


def resample(audio: np.ndarray, from_rate: int, to_rate: int, *, length: int | None = None,
             loop: bool = False) -> np.ndarray:
    """``audio`` float ``[channels, samples]`` from ``from_rate`` to ``to_rate`` Hz with soxr at
    very high quality (VHQ: linear phase, pass band to ~91 % of Nyquist, 175 dB stop band).

    Args:
        length: output samples (the grid length at ``to_rate``); the resampler's rounding is
            trimmed or zero-padded to it. None: ``round(samples * to_rate / from_rate)``.
        loop: the audio is one period of a loop: resample it circularly (wrapped around, so the
            filter sees the start after the end and the seam stays seamless).

    Returns:
        float32 ``[channels, length]``.
    """
    x = np.asarray(audio, dtype=np.float32)
    n = x.shape[1]
    if length is None:
        length = round(n * to_rate / from_rate)
    if from_rate == to_rate:
        y = x
    elif loop and n > 0:
        # Pad by a whole number of resampling periods, so the padding maps to whole output samples.
        step = from_rate // math.gcd(from_rate, to_rate)
        pad = step * max(1, math.ceil(0.05 * from_rate / step))
        reps = math.ceil(pad / n)
        tiled = np.tile(x, (1, 2 * reps + 1))
        start = reps * n - pad
        padded = tiled[:, start: start + n + 2 * pad]
        out = soxr.resample(padded.T, from_rate, to_rate, quality="VHQ").T
        skip = pad * to_rate // from_rate
        y = out[:, skip: skip + length]
    else:
        y = soxr.resample(x.T, from_rate, to_rate, quality="VHQ").T
    if y.shape[1] < length:
        y = np.pad(y, ((0, 0), (0, length - y.shape[1])))
    return np.ascontiguousarray(y[:, :length], dtype=np.float32)
