"""Static checks of the deployment files (no Docker engine here to build or run them)."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _gunicorn_config() -> dict:
    """deploy/gunicorn.conf.py evaluated as gunicorn does, under the current environment."""
    namespace: dict = {}
    exec((ROOT / "deploy" / "gunicorn.conf.py").read_text(), namespace)
    return namespace


def test_compose_services_and_gpu_reservation():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "azurite", "api", "worker", "worker-gpu", "flower"} <= set(services)
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["api"]["command"][-1] == "api:create_app()"
    for name in ("worker", "worker-gpu", "flower"):
        assert services[name]["command"][:3] == ["celery", "-A", "tasks.app"]


def test_dockerfile_copies_what_exists():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path


def test_gunicorn_config_loads():
    namespace = _gunicorn_config()
    assert namespace["workers"] >= 1 and namespace["timeout"] > 0
    assert namespace["worker_class"] == "gevent" and namespace["reuse_port"]
    assert namespace["accesslog"] is None  # GUNICORN_ACCESSLOG=- turns it on


def test_gevent_worker_yields_after_each_request(monkeypatch):
    import gevent

    namespace = _gunicorn_config()
    yields = []
    monkeypatch.setattr(gevent, "idle", lambda *a: yields.append(a))

    class GeventWorker:
        pass

    class ThreadWorker:
        pass

    namespace["post_request"](GeventWorker(), None, {}, None)
    namespace["post_request"](ThreadWorker(), None, {}, None)
    assert len(yields) == 1


def test_image_carries_a_numba_cache_written_by_the_runtime_user():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    cache_dir = re.search(r"NUMBA_CACHE_DIR=(\S+)", dockerfile).group(1)
    assert "NUMBA_CPU_NAME=generic" in dockerfile  # valid on any host CPU, not only the builder's
    user_at = dockerfile.index("USER stemgen")
    assert dockerfile.index("from stems.render import warm_up; warm_up()") > user_at
    assert re.search(rf"chown stemgen .*{re.escape(cache_dir)}", dockerfile)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    mounts = [v.split(":")[1] for s in compose["services"].values() for v in s.get("volumes", [])]
    assert not any(cache_dir.startswith(m) for m in mounts)  # a volume would hide the image's cache


@pytest.mark.parametrize(("value", "frozen"), [(None, True), ("false", False)])
def test_worker_freezes_the_loaded_app_out_of_the_collectors_reach(monkeypatch, value, frozen):
    import gc

    if value is None:
        monkeypatch.delenv("GUNICORN_GC_FREEZE", raising=False)
    else:
        monkeypatch.setenv("GUNICORN_GC_FREEZE", value)
    namespace = _gunicorn_config()
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    namespace["post_worker_init"](object())
    assert calls == (["freeze"] if frozen else [])


def test_env_example_lists_every_gunicorn_variable():
    conf = (ROOT / "deploy" / "gunicorn.conf.py").read_text()
    example = (ROOT / ".env.example").read_text()
    used = set(re.findall(r'os\.environ\.get\("(GUNICORN_\w+)"', conf))
    listed = set(re.findall(r"^# (GUNICORN_\w+)=", example, flags=re.M))
    assert used and used == listed
