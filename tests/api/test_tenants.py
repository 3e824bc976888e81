"""Ownership and limits at the gateway, on the real job store: another key's job is a 404 on every
route, an admin key sees every job, a key over its limit gets 429 with Retry-After."""

import pytest

from api import create_app
from api.metrics import SUBMISSIONS_REFUSED
from stemgen_settings import load_settings
from tests.api.conftest import JOB_STORE_URL as URL
from tests.api.test_routes import body

FIRST, SECOND, ADMIN = "first-key-0123456789", "second-key-0123456789", "admin-key-0123456789"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(real_service):
    settings = load_settings(result_backend=URL, stemgen_api_keys=f"{FIRST},{SECOND}",
                             stemgen_admin_keys=ADMIN, max_active_jobs_per_key=2,
                             max_submissions_per_minute_per_key=50)
    real_service.settings = settings
    return create_app(settings, service=real_service).test_client()


def submit(client, key, **changes):
    return client.post("/generate", json={**body(), **changes}, headers=auth(key))


def test_another_keys_job_is_a_404_like_an_unknown_one(client):
    job_id = submit(client, FIRST).get_json()["job_id"]
    unknown = client.get("/jobs/" + "0" * 32, headers=auth(SECOND))
    for answer in (client.get(f"/jobs/{job_id}", headers=auth(SECOND)),
                   client.get(f"/jobs/{job_id}/events", headers=auth(SECOND)),
                   client.delete(f"/jobs/{job_id}", headers=auth(SECOND))):
        assert answer.status_code == 404
        assert answer.get_json()["error"]["code"] == unknown.get_json()["error"]["code"] == "not_found"
    assert client.get(f"/jobs/{job_id}", headers=auth(FIRST)).get_json()["status"] == "queued"
    assert client.get("/jobs", headers=auth(SECOND)).get_json()["jobs"] == []


def test_reusing_another_keys_request_id_never_names_its_job(client):
    first = submit(client, FIRST).get_json()["job_id"]
    different = submit(client, SECOND, audio_file_id="other")
    assert different.status_code == 202 and different.get_json()["job_id"] != first
    same = submit(client, SECOND)  # same id, the first key's body: a conflict with the second's own
    assert same.status_code == 409 and first not in same.get_data(as_text=True)


def test_an_admin_key_sees_and_cancels_every_job(client):
    job_id = submit(client, FIRST).get_json()["job_id"]
    assert client.get(f"/jobs/{job_id}", headers=auth(ADMIN)).status_code == 200
    listed = client.get("/jobs", headers=auth(ADMIN)).get_json()["jobs"]
    assert [job["job_id"] for job in listed] == [job_id]
    assert client.delete(f"/jobs/{job_id}", headers=auth(ADMIN)).status_code == 202


def test_over_the_active_jobs_limit_is_a_429_naming_the_limit(client):
    before = SUBMISSIONS_REFUSED.labels("max_active_jobs")._value.get()
    for n in range(2):
        assert submit(client, FIRST, generation_request_id=f"gen-{n}").status_code == 202
    refused = submit(client, FIRST, generation_request_id="gen-9")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.get_json()["error"]
    assert error["code"] == "limit_exceeded" and error["fields"][0]["field"] == "max_active_jobs"
    assert SUBMISSIONS_REFUSED.labels("max_active_jobs")._value.get() == before + 1
    assert submit(client, FIRST, generation_request_id="gen-0").status_code == 200  # a repeat
    assert submit(client, SECOND, generation_request_id="gen-9").status_code == 202  # own limit
