"""BlobStore.open_read against a real Azurite (the one the settings name)."""

import uuid

import pytest

from stemgen_settings import load_settings
from storage import BlobNotFound, store_from_settings


@pytest.fixture
def store():
    return store_from_settings(load_settings(), container=f"test-{uuid.uuid4().hex[:12]}")


def test_open_read_gives_size_type_and_the_bytes_in_chunks(store):
    data = bytes(range(256)) * 20_000  # 5 MB: more than one chunk of the SDK's download
    store.upload("gen-1/guitar.flac", data, content_type="audio/flac")
    reader = store.open_read("gen-1/guitar.flac")
    assert reader.size == len(data)
    assert reader.content_type == "audio/flac"
    chunks = list(reader.chunks)
    assert len(chunks) > 1
    assert b"".join(chunks) == data


def test_open_read_of_a_missing_blob_is_typed(store):
    store.ensure_container()
    with pytest.raises(BlobNotFound):
        store.open_read("gen-1/none.wav")
