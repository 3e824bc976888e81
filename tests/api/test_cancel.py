"""DELETE /jobs/<id> against the real Redis job store (DB 12): 202 with the job `cancelling`,
idempotent, 409 once finished, 404 for no such job, the key rule of every job route, and the
`cancelling` event on the job's stream. Stopping the generation is tested on real parts in
tests/integration/test_cancel_end_to_end.py."""

import pytest

from api import create_app
from stemgen_settings import load_settings
from tasks.jobstore import JobFinished, JobNotFound
from tasks.stem_tasks import job_state
from tests.api.conftest import JOB_STORE_URL as URL

KEY = "key-a-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def service(real_service):  # tests/api/conftest.py: Redis DB 12, flushed
    return real_service


@pytest.fixture
def client(service):
    return create_app(load_settings(result_backend=URL, stemgen_api_keys=KEY),
                      service=service).test_client()


def submit(client, rid="c-1"):
    body = {"generation_request_id": rid, "audio_file_id": "audio-1",
            "target_stems": ["bass", "drums"],
            "parameters": {"target_bpm": 120, "duration_seconds": 4}}
    r = client.post("/generate", json=body, headers=AUTH)
    assert r.status_code == 202, r.json
    return r.json["job_id"]


def test_cancel_answers_202_with_the_job_cancelling_and_is_idempotent(client, service):
    job_id = submit(client)
    first = client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert first.status_code == 202
    assert first.json["job_id"] == job_id and first.json["status"] == "cancelling"
    assert first.json["cancel_requested_at"] > 0
    again = client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert again.status_code == 202
    assert again.json["cancel_requested_at"] == first.json["cancel_requested_at"]
    assert client.get(f"/jobs/{job_id}", headers=AUTH).json["status"] == "cancelling"
    assert service.jobs.cancel_requested(job_id)
    # one "cancelling" event however often it was asked
    events = [e for e in service.jobs.read_events(job_id) if e.type == "job"]
    assert [e.data for e in events].count(f'{{"job_id":"{job_id}","status":"cancelling"}}') == 1


def test_a_finished_job_cannot_be_cancelled(client, service):
    job_id = submit(client)
    service.jobs.finish(job_id, "completed", {"status": "completed"})
    r = client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 409
    assert r.json["error"]["code"] == "job_finished"
    assert r.json["error"]["fields"][0]["field"] == "job_id"
    assert client.get(f"/jobs/{job_id}", headers=AUTH).json["status"] == "completed"
    with pytest.raises(JobFinished):
        service.jobs.request_cancel(job_id)


def test_unknown_jobs_and_missing_keys(client, service):
    assert client.delete("/jobs/0123abcd", headers=AUTH).status_code == 404
    assert client.delete("/jobs/not-an-id!", headers=AUTH).status_code == 404
    with pytest.raises(JobNotFound):
        service.jobs.request_cancel("0123abcd")
    job_id = submit(client)
    assert client.delete(f"/jobs/{job_id}").status_code == 401
    assert not service.jobs.cancel_requested(job_id)


def test_the_final_state_of_a_cancelled_job(service):
    assert job_state([{"status": "completed"}, {"status": "cancelled"}]) == "cancelled"
    assert job_state([{"status": "completed"}, {"status": "completed"}], cancel_requested=True) == "cancelled"
    assert job_state([{"status": "completed"}, {"status": "failed"}]) == "partial"


def test_openapi_documents_the_route(client):
    operation = client.get("/openapi.json").json["paths"]["/jobs/{job_id}"]["delete"]
    assert set(operation["responses"]) >= {"202", "404", "409"}
