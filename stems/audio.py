"""Audio encoding and decoding (soundfile / libsndfile)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

WAV_SUBTYPE = "PCM_24"
WAV_CONTENT_TYPE = "audio/wav"


def encode_wav(audio: np.ndarray, sample_rate: int, *, subtype: str = WAV_SUBTYPE) -> bytes:
    """Encode ``audio`` as a RIFF WAV file.

    Args:
        audio: float samples in [-1, 1], shape ``[channels, samples]`` (or ``[samples]`` for mono).
        sample_rate: Hz.
        subtype: libsndfile subtype, 24-bit PCM by default.

    Returns:
        The file's bytes.
    """
    data = np.asarray(audio, dtype=np.float32)
    if data.ndim == 1:
        data = data[None, :]
    buffer = io.BytesIO()
    sf.write(buffer, data.T, sample_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode any libsndfile-readable file into float32 ``[channels, samples]`` and its rate in Hz.

    Raises:
        soundfile.LibsndfileError: when the bytes are not a readable audio file.
    """
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.T.copy(), int(sample_rate)
