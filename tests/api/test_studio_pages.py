"""/studio and /docs on the Flask app: open pages with their security headers, the config and
the audio relay behind the key."""

import pytest

from api import create_app
from api.studio import SWAGGER_UI_DIR
from stemgen_settings import load_settings
from storage import BlobReader
from tests.api.test_routes import FakeService

KEY = "studio-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


class StemService(FakeService):
    """FakeService with one finished job whose guitar blob is stored."""

    def __init__(self):
        super().__init__()
        self.blobs = {"gen-9/guitar.wav": b"RIFF" + bytes(100)}
        self.jobs["job9"] = {
            "job_id": "job9", "generation_request_id": "gen-9", "status": "partial",
            "stems": [{"stem": "guitar", "status": "completed", "blob_name": "gen-9/guitar.wav",
                       "format": "wav"},
                      {"stem": "bass", "status": "failed"},
                      {"stem": "drums", "status": "completed", "blob_name": "gen-9/drums.wav",
                       "format": "wav"}]}

    def open_stem_audio(self, blob_name):
        data = self.blobs.get(blob_name)
        if data is None:
            return None
        return BlobReader(size=len(data), content_type="audio/wav", chunks=iter([data[:50], data[50:]]))


@pytest.fixture
def client():
    settings = load_settings(stemgen_api_keys=KEY, musicgen_models="tiny,tiny-melody")
    return create_app(settings, service=StemService()).test_client()


@pytest.mark.parametrize("path", ["/studio", "/studio/assets/studio.js", "/studio/assets/studio.css",
                                  "/docs/assets/init.js"])
def test_pages_are_open_with_security_headers(client, path):
    r = client.get(path)
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "no-referrer"


def test_api_answers_carry_nosniff_and_no_referrer(client):
    r = client.get("/jobs/job9", headers=AUTH)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert "Content-Security-Policy" not in r.headers


def test_docs_page_needs_swagger_ui_installed(client):
    r = client.get("/docs")
    if (SWAGGER_UI_DIR / "swagger-ui-bundle.js").is_file():
        assert r.status_code == 200 and b"swagger-ui-bundle.js" in r.data
        assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    else:
        assert r.status_code == 503 and r.json["error"]["code"] == "docs_not_installed"


def test_config_needs_the_key_and_lists_the_models(client):
    assert client.get("/studio/config").status_code == 401
    r = client.get("/studio/config", headers=AUTH)
    assert r.json == {"models": ["tiny", "tiny-melody"], "max_duration_seconds": 120.0, "beats_per_bar": 4}


def test_audio_relays_a_finished_stem(client):
    assert client.get("/studio/audio/job9/guitar").status_code == 401
    r = client.get("/studio/audio/job9/guitar", headers=AUTH)
    assert r.status_code == 200
    assert r.data == b"RIFF" + bytes(100)
    assert r.headers["Content-Type"] == "audio/wav"
    assert r.headers["Content-Length"] == "104"
    assert r.headers["Content-Disposition"] == 'attachment; filename="gen-9-guitar.wav"'


@pytest.mark.parametrize("path,message", [
    ("/studio/audio/job9/bass", "is failed, not completed"),
    ("/studio/audio/job9/keys", "has no stem"),
    ("/studio/audio/job9/drums", "no longer stored"),
    ("/studio/audio/nojob/guitar", "no job"),
    ("/studio/audio/bad-id!/guitar", "no job"),
])
def test_audio_of_what_is_not_there_is_404(client, path, message):
    r = client.get(path, headers=AUTH)
    assert r.status_code == 404
    assert message in r.json["error"]["message"]
