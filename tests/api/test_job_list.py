"""GET /jobs against the real Redis job store (DB 12): key scoping, newest-first cursor pages,
filters, 422 for bad parameters, expired records skipped and cleaned out of the index."""

import time

import pytest

from api import create_app
from stemgen_settings import load_settings
from tasks.jobstore import LIST_SCAN_MAX, JobStore
from tests.api.conftest import JOB_STORE_URL as URL

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"X-API-Key": KEY_B}


@pytest.fixture
def service(real_service):  # tests/api/conftest.py: Redis DB 12, flushed
    return real_service


def make_client(service, keys=f"{KEY_A},{KEY_B}"):
    return create_app(load_settings(result_backend=URL, stemgen_api_keys=keys),
                      service=service).test_client()


@pytest.fixture
def client(service):
    return make_client(service)


def submit(client, rid, headers=A, stems=("bass",)):
    body = {"generation_request_id": rid, "audio_file_id": "audio-1", "target_stems": list(stems),
            "parameters": {"target_bpm": 120, "duration_seconds": 4}}
    r = client.post("/generate", json=body, headers=headers)
    assert r.status_code == 202, r.json
    return r.json["job_id"]


def listed(client, headers=A, **query):
    r = client.get("/jobs", query_string=query, headers=headers)
    assert r.status_code == 200, r.json
    return r.json


def test_a_caller_sees_only_its_own_jobs_newest_first(client, service):
    mine = [submit(client, f"a-{i}") for i in range(3)]
    theirs = [submit(client, f"b-{i}", headers=B) for i in range(2)]
    page = listed(client)
    assert [j["job_id"] for j in page["jobs"]] == mine[::-1]
    assert page["next_cursor"] is None
    assert [j["job_id"] for j in listed(client, headers=B)["jobs"]] == theirs[::-1]
    job = page["jobs"][0]
    assert job["status"] == "queued" and job["generation_request_id"] == "a-2"
    assert job["stems"] == [{"stem": "bass", "status": "queued", "progress": 0.0, "error": None}]
    assert job["status_url"] == f"http://localhost/jobs/{job['job_id']}"
    assert job["events_url"] == f"http://localhost/jobs/{job['job_id']}/events"
    assert client.get("/jobs").status_code == 401


def test_the_key_itself_is_not_stored(client, service):
    job_id = submit(client, "a-1")
    record = service.jobs._redis.hgetall(f"stemgen:job:{job_id}")
    assert record["owner"] and len(record["owner"]) == 16
    for key in (KEY_A, KEY_B):
        assert all(key not in value for value in record.values())
        assert not any(key in name for name in service.jobs._redis.keys("*"))


def test_cursor_pages_cover_every_job_once(client):
    ids = [submit(client, f"a-{i}") for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        page = listed(client, limit=3, **({"cursor": cursor} if cursor else {}))
        pages += 1
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3
    created = [j["created_at"] for j in listed(client, limit=100)["jobs"]]
    assert created == sorted(created, reverse=True)


def test_jobs_created_at_the_same_instant_are_paged_without_loss(service):
    # Equal scores are ordered by job id; the cursor keeps its place among them.
    store: JobStore = service.jobs
    index = store._index_key("")
    for i in range(5):
        store.create({"generation_request_id": f"g{i}", "audio_file_id": "a",
                      "target_stems": ["bass"], "parameters": {}}, ["bass"], None)
    ids = store._redis.zrevrange(index, 0, -1)
    store._redis.zadd(index, {job_id: 1_800_000_000.5 for job_id in ids})
    seen, cursor = [], None
    while True:
        page = store.list_jobs("", limit=2, cursor=cursor)
        seen += [j["job_id"] for j in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == sorted(ids, reverse=True)


def test_status_and_request_id_filters(client, service):
    ids = [submit(client, f"a-{i}") for i in range(6)]
    for job_id in ids[::2]:
        service.jobs.update_stem(job_id, "bass", "completed", 1.0, url="http://x")
        service.jobs.finish(job_id, "completed", {"error": None})
    service.jobs.update_stem(ids[1], "bass", "running", 0.5)
    completed, cursor = [], None
    while True:
        page = listed(client, status="completed", limit=1, **({"cursor": cursor} if cursor else {}))
        completed += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert completed == ids[::2][::-1]
    running = listed(client, status="running")["jobs"]
    assert [(j["job_id"], j["progress"], j["stems"][0]["status"]) for j in running] == [(ids[1], 0.5, "running")]
    assert [j["job_id"] for j in listed(client, generation_request_id="a-3")["jobs"]] == [ids[3]]
    assert listed(client, generation_request_id="a-3", status="completed")["jobs"] == []
    assert listed(client, generation_request_id="nope")["jobs"] == []
    # Another key's request id is not found, even by name.
    assert listed(client, headers=B, generation_request_id="a-3")["jobs"] == []


def test_a_status_filter_that_matches_nothing_stops_after_a_bounded_scan(service):
    store: JobStore = service.jobs
    for i in range(LIST_SCAN_MAX + 5):
        store.create({"generation_request_id": f"g{i}", "audio_file_id": "a", "target_stems": ["bass"],
                      "parameters": {}}, ["bass"], None)
    page = store.list_jobs("", status="failed", limit=10)
    assert page.jobs == [] and page.next_cursor is not None  # more to look at: follow the cursor
    page = store.list_jobs("", status="failed", limit=10, cursor=page.next_cursor)
    assert page.jobs == [] and page.next_cursor is None


@pytest.mark.parametrize("query, field", [
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"status": "done"}, "status"),
    ({"generation_request_id": "../x"}, "generation_request_id"),
    ({"cursor": "not a cursor!"}, "cursor"),
    ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),  # base64 of "not-a-cursor"
    ({"cursor": "x" * 201}, "cursor"),
    ({"color": "red"}, "color"),
])
def test_bad_parameters_are_422_naming_the_field(client, query, field):
    r = client.get("/jobs", query_string=query, headers=A)
    assert r.status_code == 422, r.json
    assert r.json["error"]["code"] == "validation_error"
    assert field in [f["field"] for f in r.json["error"]["fields"]]


def test_expired_records_are_skipped_and_removed_from_the_index(client, service):
    ids = [submit(client, f"a-{i}") for i in range(4)]
    redis = service.jobs._redis
    redis.delete(f"stemgen:job:{ids[1]}", f"stemgen:job:{ids[2]}")  # expired
    index = service.jobs._index_key(redis.hget(f"stemgen:job:{ids[0]}", "owner"))
    assert [j["job_id"] for j in listed(client)["jobs"]] == [ids[3], ids[0]]
    assert redis.zrange(index, 0, -1) == [ids[0], ids[3]]


def test_index_is_trimmed_and_expires_with_the_jobs(service):
    store = JobStore(URL, ttl_seconds=60)
    index = store._index_key("owner1")
    store._redis.zadd(index, {"old": time.time() - 120})  # older than the TTL: its record is gone
    job_id = store.create({"generation_request_id": "g", "audio_file_id": "a", "target_stems": ["bass"],
                           "parameters": {}}, ["bass"], None, owner="owner1").job_id
    assert store._redis.zrange(index, 0, -1) == [job_id]
    assert 0 < store._redis.ttl(index) <= 60
    assert 0 < store._redis.ttl(store._job_key(job_id)) <= 60


def test_open_api_lists_every_job(service):
    client = make_client(service, keys="")
    ids = [submit(client, f"o-{i}", headers={}) for i in range(2)]
    assert [j["job_id"] for j in listed(client, headers={})["jobs"]] == ids[::-1]
