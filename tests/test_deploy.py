"""Static checks of the deployment files. Building the image and running the stack take a Docker
engine and tens of minutes: `make compose-smoke` (deploy/compose/smoke.sh), not part of `make test`."""

import configparser
import importlib.util
import re
import subprocess
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
    # Written as the runtime user: after USER stemgen, or run by runuser in the app's RUN.
    warm_up_at = dockerfile.index("from stems.render import warm_up; warm_up()")
    line = dockerfile[dockerfile.rindex("\n", 0, warm_up_at):warm_up_at]
    assert "runuser -u stemgen -- " in line or warm_up_at > dockerfile.index("USER stemgen")
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


def _dockerignore_admits(path: str) -> bool:
    """Whether .dockerignore (whitelist form: `*`, then `!path` lines) lets ``path`` in."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything else (.venv, .tools, var/, .env) stays out of the context
    admitted = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    return any(path == a or path.startswith(a + "/") for a in admitted)


def test_build_context_holds_what_the_image_runs():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    needed = [p.rstrip("*") for p in setup["options.packages.find"]["include"].split()]
    # Top-level modules (stemgen_settings, stemgen_logging: imported from /app, the workdir).
    needed += [p.name for p in ROOT.glob("stemgen_*.py")]
    needed += ["setup.cfg", "pyproject.toml", "README.md", "deploy/gunicorn.conf.py",
               "requirements/audiocraft.txt", "requirements/constraints.txt"]
    assert [p for p in needed if not _dockerignore_admits(p)] == []
    for path in (".venv", ".env", ".tools", "var", "tests"):
        assert not _dockerignore_admits(path)


def test_one_image_from_a_base_chosen_at_build_time_with_the_cuda_torch():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", dockerfile, flags=re.M)
    assert re.findall(r"^FROM .*$", dockerfile, flags=re.M) == ["FROM ${BASE_IMAGE}"]  # one stage
    assert "python3 -m venv /opt/venv" in dockerfile and "VIRTUAL_ENV=/opt/venv" in dockerfile
    # PyPI's torch (the CUDA build, NVIDIA libraries as wheels): no CPU-only index or local version.
    assert "download.pytorch.org" not in dockerfile and "+cpu" not in dockerfile
    requirements = (ROOT / "requirements" / "audiocraft.txt").read_text()
    assert "torch==2.11.0" in requirements.split()
    assert "-r requirements/audiocraft.txt" in dockerfile
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    stemgen = {name: s for name, s in compose["services"].items() if "build" in s}
    assert set(stemgen) == {"api", "worker", "worker-gpu", "flower"}
    assert {s["image"] for s in stemgen.values()} == {"stemgen:latest"}
    assert {s["build"]["dockerfile"] for s in stemgen.values()} == {"deploy/Dockerfile"}


def test_compose_smoke_renders_compose_yaml_for_the_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("compose_smoke", ROOT / "deploy/compose/smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    smoke.render(tmp_path / "compose.yaml")
    rendered = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = rendered["services"]
    assert set(services) == set(compose["services"])
    assert not any("ports" in s for s in services.values())
    assert not any(key.startswith("x-") for key in rendered)
    # The stack's own commands and images run unchanged; only redis/azurite images are stand-ins.
    for name, service in services.items():
        assert service["command"] == compose["services"][name]["command"], name
    assert services["api"]["image"] == services["worker"]["image"] == "stemgen:latest"
    assert services["redis"]["image"] == "stemgen-smoke/redis:bookworm"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["MUSICGEN_MODEL"] == "tiny" and env["BROKER_URL"] == "redis://redis:6379/0"
    assert services["worker"]["environment"]["STEMGEN_DEVICE"] == "cpu"
    for entry in (e for s in services.values() for e in s.get("env_file", [])):
        assert isinstance(entry, str)  # docker-compose 1.29 reads only this form


def test_compose_smoke_is_a_make_target_outside_make_test():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^compose-smoke:.*\n\tbash deploy/compose/smoke\.sh", makefile, flags=re.M)
    prerequisites = re.findall(r"^(?:test|test-unit|test-integration|install):(.*)$", makefile, flags=re.M)
    assert not any("compose-smoke" in p for p in prerequisites)
    script = ROOT / "deploy" / "compose" / "smoke.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
