"""BlobStore against a real Azurite."""

import uuid

import pytest
import requests

from storage import BlobStore, StorageError, StorageUnavailable, blob_name_for
from stemgen_settings import AZURITE_CONNECTION_STRING
from tests.harness import free_port


@pytest.fixture
def store():
    return BlobStore(AZURITE_CONNECTION_STRING, f"test-{uuid.uuid4().hex[:12]}", sas_ttl_seconds=600)


def test_blob_name():
    assert blob_name_for("0f" * 16, "guitar") == "0f" * 16 + "/guitar.wav"


def test_upload_creates_container_and_serves_sas_url(store):
    stored = store.upload("gen-1/bass.wav", b"RIFF0000WAVE", content_type="audio/wav",
                          metadata={"bpm": 120.0, "model": "tiny", "note": "café"})
    assert stored.size_bytes == 12
    assert "sig=" in stored.url and "sp=r" in stored.url
    got = requests.get(stored.url, timeout=5)
    assert got.status_code == 200
    assert got.content == b"RIFF0000WAVE"
    assert got.headers["Content-Type"] == "audio/wav"
    assert got.headers["x-ms-meta-bpm"] == "120.0"
    # Without the SAS the blob is private.
    assert requests.get(stored.url.split("?")[0], timeout=5).status_code in (403, 404)
    # Overwrite is allowed (retried tasks land on the same name).
    store.upload("gen-1/bass.wav", b"RIFF1111WAVE", content_type="audio/wav")
    assert store.download("gen-1/bass.wav") == b"RIFF1111WAVE"


def test_unreachable_storage_is_typed():
    dead = AZURITE_CONNECTION_STRING.replace("127.0.0.1:10000", f"127.0.0.1:{free_port()}")
    store = BlobStore(dead, "x", retry_total=0, timeout_seconds=1)
    with pytest.raises(StorageUnavailable):
        store.ping()


def test_bad_connection_string():
    with pytest.raises(StorageError):
        BlobStore("not a connection string", "x")


def test_connection_failures_get_the_whole_retry_budget():
    # An outage is mostly refused connections: they must not exhaust after the SDK's default 3.
    store = BlobStore(AZURITE_CONNECTION_STRING, "x", retry_total=7)
    policy = store._service._pipeline._impl_policies  # noqa: SLF001 (inspecting the SDK pipeline)
    retry = next(p for p in policy if p.__class__.__name__ == "ExponentialRetry")
    assert retry.total_retries == 7 and retry.connect_retries == 7 and retry.read_retries == 7


def test_download_with_a_size_limit(store):
    store.upload("song.wav", b"x" * 100, content_type="audio/wav")
    assert store.download("song.wav", max_bytes=100) == b"x" * 100
    from storage import BlobNotFound, BlobTooLarge

    with pytest.raises(BlobTooLarge):
        store.download("song.wav", max_bytes=99)
    with pytest.raises(BlobNotFound):
        store.download("missing.wav", max_bytes=100)
