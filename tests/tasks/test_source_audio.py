"""The user's song for condition_on_audio: from real Azurite and a real loopback HTTP server."""

import http.server
import io
import threading
import uuid

import numpy as np
import pytest
import soundfile as sf

from stemgen_settings import load_settings
from storage import store_from_settings
from tasks.source_audio import SourceAudioError, load_source
from tests.harness import MINOR_TRIAD, groove_wav

RATE = 22050


def song(bpm=100.0, seconds=12.0) -> bytes:
    """A clicky groove over an A minor triad (stereo)."""
    return groove_wav(bpm, seconds, root_hz=220.0, triad=MINOR_TRIAD, channels=2, rate=RATE)


@pytest.fixture
def settings():
    return load_settings(source_audio_container=f"src-{uuid.uuid4().hex[:10]}",
                         callback_allow_loopback=True, storage_retry_total=1)


def upload(settings, name, data):
    store_from_settings(settings, container=settings.source_audio_container).upload(
        name, data, content_type="audio/wav")


def request(audio_file_id="song-1", **parameters):
    return {"generation_request_id": "gen-1", "audio_file_id": audio_file_id,
            "parameters": {"duration_seconds": 8, "condition_on_audio": True, **parameters}}


def test_source_from_blob_is_decoded(settings):
    data = song(bpm=100.0)
    upload(settings, "song-1", data)
    source = load_source(request(), settings)
    assert source.sample_rate == RATE and source.audio.shape[0] == 2
    decoded, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    np.testing.assert_array_equal(source.audio, decoded.T)  # the file's own samples
    assert source.subtype == "PCM_16"
    assert source.origin == f"blob:{settings.source_audio_container}/song-1"
    assert len(source.fingerprint) == 64
    assert source.duration_seconds == pytest.approx(12.0, abs=1e-3)


@pytest.mark.parametrize("data, words", [
    (b"this is not audio at all", "not a readable audio file"),
    (b"", "not a readable audio file"),
])
def test_undecodable_source_is_a_clear_error(settings, data, words):
    upload(settings, "bad", data)
    with pytest.raises(SourceAudioError, match=words):
        load_source(request("bad"), settings)


def test_missing_too_large_too_long_and_silent_sources(settings):
    upload(settings, "song-1", song(seconds=3.0))
    with pytest.raises(SourceAudioError, match="no source audio 'absent'"):
        load_source(request("absent"), settings)
    small = settings.model_copy(update={"source_audio_max_bytes": 1000})
    with pytest.raises(SourceAudioError, match="too large"):
        load_source(request(), small)
    short = settings.model_copy(update={"source_audio_max_seconds": 2.0})
    with pytest.raises(SourceAudioError, match="longer than 2 s"):
        load_source(request(), short)
    silence = io.BytesIO()
    sf.write(silence, np.zeros(RATE * 3), RATE, format="WAV")
    upload(settings, "silence", silence.getvalue())
    with pytest.raises(SourceAudioError, match="silent"):
        load_source(request("silence"), settings)


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Files.files
    server.shutdown()


def test_source_from_url(settings, file_server):
    base, files = file_server
    files["/song.wav"] = song(bpm=120.0)
    source = load_source(request(source_audio_url=f"{base}/song.wav?sig=secret"), settings)
    assert source.duration_seconds == pytest.approx(12.0, abs=1e-3)
    assert source.origin == f"{base}/song.wav"  # no SAS in reports
    with pytest.raises(SourceAudioError, match="HTTP 404"):
        load_source(request(source_audio_url=f"{base}/missing.wav"), settings)
    small = settings.model_copy(update={"source_audio_max_bytes": 1000})
    with pytest.raises(SourceAudioError, match="larger than 1000 bytes"):
        load_source(request(source_audio_url=f"{base}/song.wav"), small)
    guarded = settings.model_copy(update={"callback_allow_loopback": False})
    with pytest.raises(SourceAudioError, match="refused"):
        load_source(request(source_audio_url=f"{base}/song.wav"), guarded)
