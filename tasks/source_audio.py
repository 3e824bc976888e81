"""The user's song (``audio_file_id``) for ``condition_on_audio``: fetched and decoded (its
analysis, once per job, is tasks.song_source's).

The source is the blob named ``audio_file_id`` in ``SOURCE_AUDIO_CONTAINER`` under the prefix of
the API key that submitted the job (``{key id}/{audio_file_id}``, storage.source_blob_name: one
tenant cannot condition on another's song; no prefix without API keys), or the request's
``source_audio_url`` (fetched through the same SSRF guard as callbacks: only public addresses, or
those the operator allowed). Limits: ``SOURCE_AUDIO_MAX_BYTES`` for the file and
``SOURCE_AUDIO_MAX_SECONDS`` for the decoded audio. Anything wrong with the source itself (missing,
too large, not audio, too long, silent) is a ``SourceAudioError``: the stem fails at once with that
message, it is never retried. An unreachable storage account is ``StorageUnavailable``, which the
tasks retry as for uploads.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import requests
import soundfile as sf

from stems.audio import decode_audio
from storage import (BlobNotFound, BlobTooLarge, InvalidBlobName, StorageError, StorageUnavailable,
                     source_blob_name, store_from_settings)
from tasks.callback_target import CallbackPolicy, UnsafeCallbackURL, guarded_session

class SourceAudioError(ValueError):
    """The source audio is missing, too large, too long, silent or not audio (not retried)."""


@dataclass(frozen=True)
class SourceAudio:
    """A decoded source.

    Attributes:
        audio: float32 ``[channels, samples]``. sample_rate: Hz.
        fingerprint: SHA-256 of the file's bytes.
        origin: "blob:<container>/<name>" or the URL without its query (no SAS in reports).
        subtype: the file's sample format (libsndfile's, e.g. "PCM_16"), so an excerpt can be
            stored losslessly.
    """

    audio: np.ndarray
    sample_rate: int
    fingerprint: str
    origin: str
    subtype: str = "PCM_24"

    @property
    def duration_seconds(self) -> float:
        return self.audio.shape[1] / self.sample_rate


def fetch_source_bytes(request: dict, settings) -> tuple[bytes, str]:
    """The source file's bytes and where they came from.

    Raises:
        SourceAudioError: missing, too large, refused URL, or an HTTP error answer.
        StorageUnavailable: the storage account (or the URL's host) cannot be reached.
    """
    limit = settings.source_audio_max_bytes
    url = request["parameters"].get("source_audio_url")
    if url:
        return _fetch_url(url, limit, settings), url.split("?", 1)[0]
    try:
        name = source_blob_name(request.get("owner", ""), request["audio_file_id"])
    except InvalidBlobName as exc:
        raise SourceAudioError(str(exc)) from None
    store = store_from_settings(settings, container=settings.source_audio_container)
    try:
        data = store.download(name, max_bytes=limit)
    except BlobNotFound:
        raise SourceAudioError(f"no source audio {request['audio_file_id']!r} in container "
                               f"{settings.source_audio_container!r} for this API key") from None
    except BlobTooLarge as exc:
        raise SourceAudioError(f"source audio too large: {exc} (SOURCE_AUDIO_MAX_BYTES)") from None
    except StorageUnavailable:
        raise
    except StorageError as exc:
        raise SourceAudioError(f"source audio not readable: {exc}") from None
    return data, f"blob:{settings.source_audio_container}/{name}"


def _fetch_url(url: str, limit: int, settings) -> bytes:
    session = guarded_session(CallbackPolicy.from_settings(settings))
    timeout = (settings.callback_connect_timeout_seconds, settings.storage_timeout_seconds)
    try:
        with session.get(url, stream=True, timeout=timeout, allow_redirects=False) as answer:
            if answer.status_code != 200:
                raise SourceAudioError(f"source_audio_url answered HTTP {answer.status_code}")
            chunks, size = [], 0
            for chunk in answer.iter_content(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise SourceAudioError(f"source audio larger than {limit} bytes (SOURCE_AUDIO_MAX_BYTES)")
                chunks.append(chunk)
            return b"".join(chunks)
    except UnsafeCallbackURL as exc:
        raise SourceAudioError(f"source_audio_url refused: {exc}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise StorageUnavailable(f"source_audio_url unreachable: {exc.__class__.__name__}") from exc
    finally:
        session.close()


def decode_source(data: bytes, origin: str, settings) -> SourceAudio:
    """Decode a source file (libsndfile: WAV, FLAC, OGG, MP3).

    Raises:
        SourceAudioError: not audio, longer than SOURCE_AUDIO_MAX_SECONDS, or silent.
    """
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise SourceAudioError(f"source audio is not a readable audio file: {exc}") from None
    if info.duration > settings.source_audio_max_seconds:
        raise SourceAudioError(f"source audio is {info.duration:.1f} s, longer than "
                               f"{settings.source_audio_max_seconds:g} s (SOURCE_AUDIO_MAX_SECONDS)")
    try:
        audio, rate = decode_audio(data)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise SourceAudioError(f"source audio is not a readable audio file: {exc}") from None
    if audio.shape[1] < rate or not np.all(np.isfinite(audio)) or np.max(np.abs(audio)) < 1e-4:
        raise SourceAudioError("source audio is shorter than 1 s or silent")
    return SourceAudio(audio=audio, sample_rate=rate, fingerprint=hashlib.sha256(data).hexdigest(),
                       origin=origin, subtype=info.subtype)


def load_source(request: dict, settings) -> SourceAudio:
    """Fetch and decode the request's source audio (see the module doc).

    Raises:
        SourceAudioError, StorageUnavailable.
    """
    data, origin = fetch_source_bytes(request, settings)
    return decode_source(data, origin, settings)
