"""Redis URLs (tasks.redis_connection): parsing, the clients they give, Celery's form of them, and
the shipped Redis configurations' durability. No server is needed except where a test says so."""

import re
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from redis.sentinel import SentinelConnectionPool

from stemgen_settings import load_settings
from tasks.app import celery_config
from tasks.redis_connection import (
    DEFAULT_WAIT_TIMEOUT_MS,
    ReplicatedRedis,
    ReplicationTimeout,
    RedisURLError,
    celery_url,
    connect,
    parse_redis_url,
)
from tests.harness import REDIS

ROOT = Path(__file__).resolve().parents[2]


def test_plain_url_keeps_redis_py_options_and_drops_stemgens():
    parsed = parse_redis_url("redis://:pw@cache:6380/3?socket_timeout=2&wait_replicas=1&wait_timeout_ms=250")
    assert parsed.scheme == "redis" and parsed.wait_replicas == 1 and parsed.wait_timeout_ms == 250
    assert parsed.url == "redis://:pw@cache:6380/3?socket_timeout=2"
    assert parse_redis_url("rediss://h/1").url == "rediss://h/1"
    assert parse_redis_url("unix:///run/redis.sock?db=2").url == "unix:///run/redis.sock?db=2"
    plain = parse_redis_url("redis://127.0.0.1:6379/1")
    assert plain.wait_replicas == 0 and plain.wait_timeout_ms == DEFAULT_WAIT_TIMEOUT_MS


def test_sentinel_url_hosts_master_db_and_passwords():
    parsed = parse_redis_url("sentinel://:s3cr%40t@s1:26380,s2,[::1]:26381/2"
                             "?master=stemgen&sentinel_password=sp&wait_replicas=1")
    assert parsed.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (parsed.master, parsed.db, parsed.password, parsed.username) == ("stemgen", 2, "s3cr@t", None)
    assert parsed.sentinel_password == "sp" and parsed.wait_replicas == 1
    assert parse_redis_url("sentinel://user:pw@s1:26379?master=m").db == 0
    assert parse_redis_url("sentinel://user:pw@s1:26379?master=m").username == "user"


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@h:5672//",             # not Redis
    "http://h:6379/0",
    "sentinel://s1:26379/0",                    # no master name
    "sentinel://s1:26379/0?master=",
    "sentinel:///0?master=m",                   # no sentinel address
    "sentinel://s1:port/0?master=m",            # bad port
    "sentinel://s1:26379/db1?master=m",         # bad db
    "sentinel://s1:26379/0?master=m&socket_timeout=1",  # an option nothing would apply
    "redis://h/0?wait_replicas=-1",
    "redis://h/0?wait_replicas=one",
    "redis://h/0?wait_timeout_ms=0",
])
def test_unusable_urls_are_refused(url):
    with pytest.raises(RedisURLError):
        parse_redis_url(url)


def test_celery_form_of_sentinel_and_plain_urls():
    url, options = celery_url("sentinel://:pw@s1:26379,s2:26380/1?master=stemgen&wait_replicas=1")
    assert url == "sentinel://:pw@s1:26379/1;sentinel://:pw@s2:26380/1"
    assert options == {"master_name": "stemgen"}
    url, options = celery_url("sentinel://s1/0?master=m&sentinel_password=x")
    assert (url, options) == ("sentinel://s1:26379/0", {"master_name": "m", "sentinel_kwargs": {"password": "x"}})
    assert celery_url("redis://h:6379/1?wait_replicas=1&wait_timeout_ms=9") == ("redis://h:6379/1", {})
    assert celery_url("amqp://guest:guest@h:5672//") == ("amqp://guest:guest@h:5672//", {})


def test_celery_config_carries_the_master_name_for_broker_and_results():
    settings = load_settings(broker_url="sentinel://s1:26379,s2:26379/0?master=stemgen",
                             result_backend="sentinel://s1:26379,s2:26379/1?master=stemgen&wait_replicas=1")
    config = celery_config(settings)
    assert config["broker_url"] == "sentinel://s1:26379/0;sentinel://s2:26379/0"
    assert config["result_backend"] == "sentinel://s1:26379/1;sentinel://s2:26379/1"
    assert config["broker_transport_options"]["master_name"] == "stemgen"
    assert config["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout_seconds
    assert config["result_backend_transport_options"]["master_name"] == "stemgen"
    plain = celery_config(load_settings())
    assert "master_name" not in plain["broker_transport_options"]


def test_celery_builds_sentinel_broker_and_backend_even_under_the_celery_command(monkeypatch):
    """kombu and Celery accept the translated form (no server contacted: the pools are lazy), also
    when the celery command copied the raw URLs into CELERY_BROKER_URL / CELERY_RESULT_BACKEND
    (which Celery otherwise prefers over its configuration)."""
    from tasks.app import create_celery

    broker = "sentinel://127.0.0.1:1,127.0.0.1:2/0?master=stemgen"
    backend = "sentinel://127.0.0.1:1/1?master=stemgen&wait_replicas=1"
    monkeypatch.setenv("CELERY_BROKER_URL", broker)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", backend)
    app = create_celery(load_settings(broker_url=broker, result_backend=backend))
    assert type(app.backend).__name__ == "SentinelBackend"
    assert app.backend._transport_options["master_name"] == "stemgen"
    for conn in (app.connection_for_write(), app.connection_for_read()):
        with conn:
            assert conn.transport_cls == "sentinel"
            assert conn.alt == ["sentinel://127.0.0.1:1/0", "sentinel://127.0.0.1:2/0"]
            assert conn.transport_options["master_name"] == "stemgen"


def test_connect_gives_sentinel_managed_and_replicated_clients():
    client = connect("sentinel://127.0.0.1:1,127.0.0.1:2/3?master=stemgen&wait_replicas=2"
                     "&wait_timeout_ms=50", decode_responses=True, socket_timeout=1)
    assert isinstance(client, ReplicatedRedis)
    assert (client.wait_replicas, client.wait_timeout_ms) == (2, 50)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "stemgen"
    assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["decode_responses"]
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    assert sentinels[0].connection_pool.connection_kwargs["socket_timeout"] == 1
    plain = connect(f"{REDIS}/13")
    assert type(plain) is redis.Redis


URL = f"{REDIS}/13"


@pytest.mark.integration
def test_replicated_writes_fail_without_replicas():
    """Against the shared Redis (no replica): with wait_replicas=1 a write is applied but not
    acknowledged, so it raises ReplicationTimeout, a TimeoutError, which the gateway answers with
    503; reads do not wait; with wait_replicas=0 nothing changes."""
    client = connect(URL + "?wait_replicas=1&wait_timeout_ms=20", decode_responses=True)
    plain = connect(URL, decode_responses=True)
    plain.delete("stemgen:test:replicated")
    with pytest.raises(ReplicationTimeout) as caught:
        client.set("stemgen:test:replicated", "1")
    assert isinstance(caught.value, redis.exceptions.TimeoutError)
    assert caught.value.acknowledged == 0 and caught.value.wanted == 1
    assert client.get("stemgen:test:replicated") == "1"  # applied on the primary; a read never waits
    with pytest.raises(ReplicationTimeout):
        with client.pipeline() as pipe:
            pipe.hset("stemgen:test:replicated-hash", "a", 1).expire("stemgen:test:replicated-hash", 60)
            pipe.execute()
    with client.pipeline() as pipe:  # reads only: no wait
        assert pipe.get("stemgen:test:replicated").execute() == ["1"]
    # A script the server has not seen: EVALSHA answers NOSCRIPT, redis-py loads it and runs it
    # again (the NOSCRIPT error must come out of the waiting pipeline as itself).
    script = client.register_script(f"-- {uuid.uuid4().hex}\nreturn redis.call('SET', KEYS[1], ARGV[1])")
    with pytest.raises(ReplicationTimeout):
        script(keys=["stemgen:test:replicated"], args=["2"])
    assert client.get("stemgen:test:replicated") == "2"
    assert plain.set("stemgen:test:replicated", "3")  # wait_replicas=0: no WAIT
    plain.delete("stemgen:test:replicated", "stemgen:test:replicated-hash")


def _config_args(text: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^\s*(\S+)\s+(\S+)\s*$", text, re.M)
            if not m.group(1).startswith("#")}


def test_shipped_redis_configurations_fsync_every_write():
    """compose.yaml's Redis and make run's (deploy/local/redis-durable.conf) append every write to
    an append-only file and fsync it before answering."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    command = compose["services"]["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "always"
    local = _config_args((ROOT / "deploy" / "local" / "redis-durable.conf").read_text())
    assert local["appendonly"] == "yes" and local["appendfsync"] == "always"
    assert "redis-durable.conf" in (ROOT / "deploy" / "local" / "run.sh").read_text()
