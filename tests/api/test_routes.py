"""Gateway routes against a fake task layer (the boundary); schemas and errors are real."""

import pytest

from api import create_app
from stemgen_settings import load_settings
from tasks.jobstore import IdempotencyConflict, JobFinished, JobNotFound, Submission
from tasks.service import ComponentHealth


class FakeService:
    def __init__(self):
        self.submitted = []
        self.jobs = {}
        self.broker_ok = True

    def submit(self, request, callback_url, owner=""):
        rid = request["generation_request_id"]
        for job_id, job in self.jobs.items():
            if job["generation_request_id"] == rid:
                if job["request"] != request:
                    raise IdempotencyConflict(rid, job_id)
                return Submission(job_id, created=False)
        job_id = f"job{len(self.jobs) + 1}"
        self.submitted.append((request, callback_url))
        self.jobs[job_id] = {
            "job_id": job_id, "generation_request_id": rid, "audio_file_id": request["audio_file_id"],
            "status": "queued", "progress": 0.0, "created_at": 1.0, "updated_at": 1.0,
            "finished_at": None, "request": request,
            "stems": [{"stem": s, "status": "queued", "progress": 0.0} for s in request["target_stems"]],
            "callback": {"url": callback_url, "state": "pending" if callback_url else "none",
                         "attempts": 0, "error": None},
        }
        return Submission(job_id, created=True)

    def get(self, job_id, owner=None):
        if job_id not in self.jobs:
            raise JobNotFound(job_id)
        return self.jobs[job_id]

    def cancel(self, job_id, owner=None):
        job = self.get(job_id)
        if job["status"] in ("completed", "failed", "partial", "cancelled"):
            raise JobFinished(job_id, job["status"])
        job["status"] = "cancelling"
        return job

    def broker_health(self):
        return ComponentHealth(self.broker_ok, "" if self.broker_ok else "down")

    def storage_health(self):
        return ComponentHealth(True)

    def workers(self):
        return [{"name": "w@h", "model": "tiny", "device": "cpu"}]

    def outbox(self):
        return {"pending": len(self.jobs), "overdue_seconds": 0.0}


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def client(service):
    settings = load_settings(default_callback_url="http://backend.test/cb", max_duration_seconds=30)
    return create_app(settings, service=service).test_client()


def body(**overrides):
    base = {"generation_request_id": "gen-123", "audio_file_id": "audio-123",
            "target_stems": ["guitar", "bass", "drums"],
            "callback_url": "https://backend.example/api/stems/callback",
            "parameters": {"target_bpm": 120.0, "duration_seconds": 10.0, "style": "rock",
                           "prompt": "energetic rock guitar"}}
    base.update(overrides)
    return base


def test_generate_accepts_backend_shape(client, service):
    r = client.post("/generate", json=body())
    assert r.status_code == 202
    assert r.json["job_id"] == "job1"
    assert r.json["status"] == "queued"
    assert r.json["status_url"] == "http://localhost/jobs/job1"
    assert r.headers["Location"] == r.json["status_url"]
    request, callback = service.submitted[0]
    assert callback == "https://backend.example/api/stems/callback"
    assert request["parameters"]["target_bpm"] == 120.0


def test_default_callback_url_when_omitted(client, service):
    b = body()
    del b["callback_url"]
    assert client.post("/generate", json=b).status_code == 202
    assert service.submitted[0][1] == "http://backend.test/cb"


def test_same_request_again_returns_same_job(client, service):
    first = client.post("/generate", json=body())
    again = client.post("/generate", json=body())
    assert again.status_code == 200
    assert again.json["job_id"] == first.json["job_id"]
    assert len(service.submitted) == 1


def test_same_id_different_body_is_409(client):
    client.post("/generate", json=body())
    r = client.post("/generate", json=body(audio_file_id="other"))
    assert r.status_code == 409
    assert r.json["error"]["fields"][0]["field"] == "generation_request_id"


@pytest.mark.parametrize("change, field", [
    ({"target_stems": ["piano"]}, "target_stems.0"),
    ({"target_stems": []}, "target_stems"),
    ({"target_stems": ["bass", "bass"]}, "target_stems"),
    ({"parameters": {"target_bpm": 39, "duration_seconds": 5}}, "parameters.target_bpm"),
    ({"parameters": {"target_bpm": 241, "duration_seconds": 5}}, "parameters.target_bpm"),
    ({"parameters": {"target_bpm": 120, "duration_seconds": 0}}, "parameters.duration_seconds"),
    ({"parameters": {"target_bpm": 120, "duration_seconds": 31}}, "parameters.duration_seconds"),
    ({"parameters": {"target_bpm": "fast", "duration_seconds": 5}}, "parameters.target_bpm"),
    ({"parameters": {"duration_seconds": 5}}, "parameters.target_bpm"),
    ({"parameters": {"target_bpm": 120, "duration_seconds": 5, "top_p": 2}}, "parameters.top_p"),
    ({"parameters": {"target_bpm": 120, "duration_seconds": 5, "bpm": 2}}, "parameters.bpm"),
    ({"generation_request_id": ""}, "generation_request_id"),
    ({"generation_request_id": "../../etc"}, "generation_request_id"),
    ({"callback_url": "ftp://x/y"}, "callback_url"),
    ({"audio_file_id": None}, "audio_file_id"),
])
def test_invalid_fields_are_named(client, change, field):
    r = client.post("/generate", json=body(**change))
    assert r.status_code == 422
    assert field in [f["field"] for f in r.json["error"]["fields"]]


def test_nan_bpm_rejected(client):
    raw = '{"generation_request_id":"g","audio_file_id":"a","target_stems":["bass"],' \
          '"parameters":{"target_bpm":NaN,"duration_seconds":5}}'
    r = client.post("/generate", data=raw, content_type="application/json")
    assert r.status_code in (400, 422)
    assert r.json["error"]["fields"]


def test_wrong_content_type_is_415(client):
    r = client.post("/generate", data="a=b", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415
    assert r.json["error"]["code"] == "unsupported_media_type"


def test_broken_json_is_400(client):
    r = client.post("/generate", data="{not json", content_type="application/json")
    assert r.status_code == 400
    assert r.json["error"]["code"] == "invalid_json"


def test_non_object_json_is_422(client):
    r = client.post("/generate", json=[1, 2])
    assert r.status_code == 422


def test_oversized_body_is_413(client):
    r = client.post("/generate", json=body(audio_file_id="x" * 100_000))
    assert r.status_code == 413
    assert r.json["error"]["status"] == 413


def test_job_status_and_404(client):
    job_id = client.post("/generate", json=body()).json["job_id"]
    r = client.get(f"/jobs/{job_id}")
    assert r.status_code == 200
    assert r.json["status"] == "queued"
    assert [s["stem"] for s in r.json["stems"]] == ["guitar", "bass", "drums"]
    assert "request" not in r.json
    assert client.get("/jobs/nope").status_code == 404
    assert client.get("/jobs/" + "a" * 200).status_code == 404


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nothing").json["error"]["status"] == 404
    assert client.get("/generate").status_code == 405


def test_health_endpoints(client, service):
    assert client.get("/health/live").json == {"status": "ok"}
    assert client.get("/health/ready").status_code == 200
    assert client.get("/health").json["workers"][0]["device"] == "cpu"
    client.post("/generate", json=body())
    assert client.get("/health").json["outbox"] == {"pending": 1, "overdue_seconds": 0.0}
    service.broker_ok = False
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health").status_code == 503
    assert client.get("/health/live").status_code == 200


def test_health_is_degraded_when_every_answering_worker_is_hung(client, service, monkeypatch):
    assert client.get("/health").json["status"] == "ok"
    hung = {"name": "w@h", "model": "tiny", "device": "cpu", "ready": False,
            "not_ready_reason": "generation hung: … ran past its deadline of 2 s"}
    monkeypatch.setattr(service, "workers", lambda: [hung])
    answer = client.get("/health")
    assert answer.status_code == 200 and answer.json["status"] == "degraded"
    assert answer.json["workers"][0]["ready"] is False
    monkeypatch.setattr(service, "workers", lambda: [hung, {**hung, "name": "w2@h", "ready": True}])
    assert client.get("/health").json["status"] == "ok"


def test_openapi_generated_from_schemas(client):
    doc = client.get("/openapi.json").json
    params = doc["components"]["schemas"]["GenerationParameters"]
    # optional (it may come from the source audio): a number in range, or null
    bpm = next(s for s in params["properties"]["target_bpm"]["anyOf"] if s["type"] == "number")
    assert bpm["minimum"] == 40 and bpm["maximum"] == 240
    # optional (a source_region may give bars instead): a number up to the configured max, or null
    duration = next(s for s in params["properties"]["duration_seconds"]["anyOf"]
                    if s["type"] == "number")
    assert duration["maximum"] == 30 and "duration_seconds" not in params.get("required", [])
    assert doc["components"]["schemas"]["GenerateRequest"]["required"] == [
        "generation_request_id", "audio_file_id", "target_stems", "parameters"]
    assert "422" in doc["paths"]["/generate"]["post"]["responses"]
