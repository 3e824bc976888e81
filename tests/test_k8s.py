"""The cluster manifests (deploy/k8s): every overlay rendered with kustomize (kubectl's, installed by
``make install`` into .tools/bin), every document validated against the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields are errors) or, for KEDA's ScaledObject, against the
JSON schema that ``make install`` generates into .tools/keda from the npm package
@kubernetes-models/keda (unknown fields are errors there too), and the properties that tie the
manifests to the code checked against the code itself: the probes' routes in the Flask app, the
queue names and the settings, the grace periods against the settings' bounds on the longest task.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from stemgen_settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
#: Kubernetes versions whose schemas every document must satisfy (kubernetes-validate bundles them):
#: an old one still in support and the one of the kubectl that renders.
K8S_VERSIONS = ("1.30.0", "1.35.0")
#: KEDA's ScaledObject as a JSON schema (draft 7, unknown fields forbidden): `make install` generates
#: it from the types of the npm package @kubernetes-models/keda (see the Makefile).
KEDA_SCHEMA = ROOT / ".tools" / "keda" / "scaledobject.schema.json"
SECRET_VARIABLES = {"AZURE_STORAGE_CONNECTION_STRING", "CALLBACK_SECRET", "STEMGEN_API_KEYS",
                    "STEMGEN_ADMIN_KEYS"}
#: gunicorn's variables (deploy/gunicorn.conf.py): not Settings fields, but real configuration.
GUNICORN_VARIABLE = re.compile(r"GUNICORN_[A-Z_]+")


def test_there_is_a_gpu_and_a_cpu_only_overlay():
    assert {"gpu", "cpu-only"} <= set(OVERLAYS)


# --- rendering -----------------------------------------------------------------------------------

def _kustomize() -> list[str]:
    local = ROOT / ".tools" / "bin" / "kubectl"
    if local.is_file():
        return [str(local), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize: `make install` puts kubectl (with kustomize) into .tools/bin")


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([*_kustomize(), str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def docs(request) -> list[dict]:
    return copy.deepcopy(list(_render(request.param)))


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _all(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _queues(workload: dict) -> list[str] | None:
    """The queues a Celery worker consumes (its -Q), None for a workload that is no Celery worker."""
    command = _container(workload).get("command", [])
    if command[:4] != ["celery", "-A", "tasks.app", "worker"]:
        return None
    return command[command.index("-Q") + 1].split(",")


def _config_object(docs) -> dict:
    """The ConfigMap of the settings (stemgen-config, its name suffixed with a content hash)."""
    (config,) = [d for d in _all(docs, "ConfigMap") if d["metadata"]["name"].startswith("stemgen-config")]
    return config


def _configmap(docs) -> dict:
    return _config_object(docs)["data"]


def _settings_of(docs, workload: dict) -> Settings:
    """The Settings a workload's container reads: the ConfigMap, then its own literal env."""
    container = _container(workload)
    names = {ref["configMapRef"]["name"] for ref in container.get("envFrom", [])}
    assert names == {_config_object(docs)["metadata"]["name"]}
    values = dict(_configmap(docs))
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    fields = {k.lower(): v for k, v in values.items() if k.lower() in Settings.model_fields}
    return Settings(_env_file=None, **fields)


# --- schemas -------------------------------------------------------------------------------------

#: Custom resources and the JSON schemas `make install` generates for them from npm packages of their
#: types (see the Makefile): KEDA's, and the Prometheus Operator's (component monitoring).
CRD_SCHEMAS = {
    "keda.sh/": KEDA_SCHEMA,
    "monitoring.coreos.com/": ROOT / ".tools" / "prometheus-operator" / "{kind}.schema.json",
}


@functools.cache
def _crd_validator(path: Path) -> tuple[str, str, jsonschema.protocols.Validator]:
    if not path.is_file():
        pytest.fail(f"no schema at {path.relative_to(ROOT)}: `make install` generates it from an "
                    "npm package of the resource's types")
    schema = json.loads(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    root = schema["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    # Strict as kubectl apply --validate=strict: the object and its spec forbid unknown fields.
    assert root["additionalProperties"] is False
    assert root["properties"]["spec"]["additionalProperties"] is False
    api_version, kind = (root["properties"][name]["const"] for name in ("apiVersion", "kind"))
    return api_version, kind, jsonschema.Draft7Validator(schema)


def _validate(doc: dict) -> None:
    """Raise on a document that its schema rejects."""
    for group, path in CRD_SCHEMAS.items():
        if doc["apiVersion"].startswith(group):
            api_version, kind, validator = _crd_validator(Path(str(path).format(kind=doc["kind"].lower())))
            assert (doc["apiVersion"], doc["kind"]) == (api_version, kind), "no schema for this kind"
            error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
            if error is not None:
                raise error
            return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_document_passes_its_schema(docs):
    assert docs
    for doc in docs:
        try:
            _validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_the_validators_reject_what_a_cluster_would():
    docs = copy.deepcopy(list(_render("gpu")))
    deployment = _one(docs, "Deployment", "stemgen-gateway")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    scaled = _one(docs, "ScaledObject")
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        _validate(misspelt)
    wrong_type = copy.deepcopy(scaled)
    wrong_type["spec"]["triggers"][0]["metadata"]["listLength"] = 8  # trigger metadata: strings
    with pytest.raises(jsonschema.ValidationError):
        _validate(wrong_type)
    no_trigger = copy.deepcopy(scaled)
    del no_trigger["spec"]["triggers"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(no_trigger)


# --- wiring inside the render --------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_selectors_and_targets_match_something_rendered(docs):
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs)]
    for workload in _workloads(docs):
        assert _selects(workload["spec"]["selector"]["matchLabels"],
                        workload["spec"]["template"]["metadata"]["labels"])
    for pdb in _all(docs, "PodDisruptionBudget"):
        assert sum(_selects(pdb["spec"]["selector"]["matchLabels"], p) for p in pod_labels) == 1
    for service in _all(docs, "Service"):
        (selected,) = [w for w in _workloads(docs)
                       if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        port_names = {p["name"] for p in _container(selected).get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    deployments = {d["metadata"]["name"]: d for d in _all(docs, "Deployment")}
    for hpa in _all(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert "replicas" not in deployments[hpa["spec"]["scaleTargetRef"]["name"]]["spec"]
    for scaled in _all(docs, "ScaledObject"):
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
        assert "replicas" not in deployments[scaled["spec"]["scaleTargetRef"]["name"]]["spec"]
    claims = {c["metadata"]["name"] for c in _all(docs, "PersistentVolumeClaim")}
    for workload in _workloads(docs):
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    namespaces = {d["metadata"]["name"] for d in _all(docs, "Namespace")}
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == namespaces


def test_configuration_uses_the_settings_names_and_secrets_come_from_a_secret(docs):
    config = _configmap(docs)
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", (ROOT / ".env.example").read_text(), flags=re.M))
    # Names of .env.example (a variable left out takes its default), never a secret.
    assert set(config) <= set(example) - SECRET_VARIABLES
    assert all(name.lower() in Settings.model_fields for name in config)
    for workload in _workloads(docs):
        if _queues(workload) is None and "gunicorn" not in _container(workload).get("command", []):
            continue  # Redis
        env = _container(workload).get("env", [])
        for item in env:
            name = item["name"]
            assert name.lower() in Settings.model_fields or GUNICORN_VARIABLE.fullmatch(name), name
            if name in SECRET_VARIABLES:
                assert set(item) == {"name", "valueFrom"}
                assert item["valueFrom"]["secretKeyRef"]["key"] == name
        _settings_of(docs, workload)  # every value parses
    assert not _all(docs, "Secret")  # created by the operator, never rendered from this repository


# --- the gateway ---------------------------------------------------------------------------------

def _gateway(docs) -> dict:
    (gateway,) = [w for w in _all(docs, "Deployment") if "gunicorn" in _container(w).get("command", [])]
    return gateway


def test_gateway_probes_hit_open_health_routes_of_the_app(docs):
    from api import create_app
    from tests.api.test_routes import FakeService

    container = _container(_gateway(docs))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    namespace: dict = {}
    exec((ROOT / "deploy" / "gunicorn.conf.py").read_text(), namespace)
    assert set(ports.values()) == {int(namespace["bind"].rsplit(":", 1)[1])}

    service = FakeService()
    settings = _settings_of(docs, _gateway(docs)).model_copy(
        update={"stemgen_api_keys": "probe-test-key-0123456789"})
    client = create_app(settings, service=service).test_client()
    probes = {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        assert probe["httpGet"]["port"] in ports, kind
        assert client.get(probe["httpGet"]["path"]).status_code == 200, kind  # no API key
    # Broker (job store) down: not ready, so the Service stops routing here; but alive (no restart).
    service.broker_ok = False
    assert client.get(probes["readinessProbe"]["httpGet"]["path"]).status_code == 503
    assert client.get(probes["livenessProbe"]["httpGet"]["path"]).status_code == 200


def test_gateway_is_scaled_on_cpu_and_drains_before_it_stops(docs):
    gateway = _gateway(docs)
    (hpa,) = [h for h in _all(docs, "HorizontalPodAutoscaler")
              if h["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    container = _container(gateway)
    assert "cpu" in container["resources"]["requests"]  # utilisation is relative to the request
    namespace: dict = {}
    exec((ROOT / "deploy" / "gunicorn.conf.py").read_text(), namespace)
    (pause,) = container["lifecycle"]["preStop"]["exec"]["command"][1:]
    spec = gateway["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > int(pause) + namespace["graceful_timeout"]


# --- the workers ---------------------------------------------------------------------------------

def _stems_workers(docs) -> list[dict]:
    stems = Settings.model_fields["stems_queue"].default
    return [w for w in _all(docs, "Deployment") if stems in (_queues(w) or [])]


def test_each_queue_has_a_worker_and_dispatch_never_scales_to_zero(docs):
    settings = _settings_of(docs, _all(docs, "Deployment")[0])
    consumed = {q for w in _all(docs, "Deployment") for q in (_queues(w) or [])}
    assert consumed == {settings.stems_queue, settings.callbacks_queue}
    scaled_from_zero = {s["spec"]["scaleTargetRef"]["name"] for s in _all(docs, "ScaledObject")
                        if s["spec"].get("minReplicaCount", 1) == 0}
    always_up = [w for w in _all(docs, "Deployment") if _queues(w) is not None
                 and w["metadata"]["name"] not in scaled_from_zero
                 and w["spec"].get("replicas", 1) >= 1 and _settings_of(docs, w).dispatcher_enabled]
    assert always_up  # otherwise accepted jobs wait in the outbox and the stems queue stays empty
    for worker in _all(docs, "Deployment"):
        if _queues(worker) == [settings.callbacks_queue]:
            assert not _settings_of(docs, worker).preload_model  # it never generates


def test_worker_probes_are_a_valid_celery_ping_of_the_pods_own_node():
    from celery.utils.nodenames import default_nodename

    commands = set()
    for overlay in OVERLAYS:
        docs = _render(overlay)
        for w in _all(docs, "Deployment"):
            if _queues(w) is None:
                continue
            container = _container(w)
            if _settings_of(docs, w).preload_model:
                # a model worker is started and ready once its ready file exists (tasks.readiness)
                for kind in ("startupProbe", "readinessProbe"):
                    assert container[kind]["exec"]["command"] == ["test", "-f", "/tmp/stemgen-worker-ready"]
                kinds = ("livenessProbe",)
            else:
                kinds = ("startupProbe", "livenessProbe")
            commands |= {tuple(container[kind]["exec"]["command"]) for kind in kinds}
    for command in commands:
        assert command[:2] == ("sh", "-c")
        argv = shlex.split(command[2].removeprefix("exec "))
        # A pod's HOSTNAME is its host name, which names the Celery node by default.
        assert argv[argv.index("-d") + 1] == "celery@$HOSTNAME"
        assert default_nodename(None) == f"celery@{socket.gethostname()}"
        assert argv[:2] == ["celery", "-A"] and argv[3:5] == ["inspect", "ping"]
        # The CLI accepts these options (a wrong one is a usage error, exit 2, before --help) ...
        celery = str(Path(sys.executable).with_name("celery"))
        done = subprocess.run([celery, *argv[1:], "--help"], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert done.returncode == 0 and "--destination" in done.stdout, done.stderr
        # ... and the app's workers know the command.
        done = subprocess.run([celery, *argv[1:3], "inspect", "--list"], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert argv[4] in re.findall(r"^  (\w+)", done.stdout, flags=re.M)


def test_workers_get_a_grace_period_above_their_longest_task(docs):
    from tasks.app import celery_config
    from tasks.callback_delivery import delivery_lock_seconds

    for worker in _all(docs, "Deployment"):
        queues = _queues(worker)
        if queues is None:
            continue
        settings = _settings_of(docs, worker)
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        hard_limit = celery_config(settings).get("task_time_limit")
        if hard_limit:
            assert grace > hard_limit
        if settings.stems_queue in queues:
            # The settings require the visibility timeout to exceed the longest task: a grace
            # period above it lets every generation finish on SIGTERM (warm shutdown).
            assert grace > settings.visibility_timeout_seconds
            assert worker["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        else:
            assert grace > delivery_lock_seconds(settings)


def test_generation_deadline_is_below_the_visibility_timeout_and_within_the_grace_period():
    """One place: the settings hold the deadline, the visibility timeout and the grace period (and
    refuse a deadline at or above the visibility timeout, or above the grace period); each stems
    worker's terminationGracePeriodSeconds is its WORKER_GRACE_PERIOD_SECONDS."""
    from stemgen_settings import load_settings

    defaults = load_settings(_env_file=None)
    assert defaults.generation_deadline_seconds < defaults.visibility_timeout_seconds
    assert defaults.generation_deadline_seconds <= defaults.worker_grace_period_seconds
    for wrong in (dict(visibility_timeout_seconds=900, generation_deadline_seconds=900),
                  dict(worker_grace_period_seconds=500, generation_deadline_seconds=501)):
        with pytest.raises(ValueError, match="GENERATION_DEADLINE_SECONDS"):
            load_settings(_env_file=None, **wrong)
    checked = 0
    for overlay in OVERLAYS:
        docs = _render(overlay)
        for worker in _stems_workers(docs):
            settings = _settings_of(docs, worker)
            grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert settings.generation_deadline_seconds < settings.visibility_timeout_seconds
            assert settings.generation_deadline_seconds <= grace
            assert settings.worker_grace_period_seconds == grace
            checked += 1
    assert checked >= len(OVERLAYS)


def test_gpu_workers_request_a_gpu_and_land_on_gpu_nodes():
    for overlay in OVERLAYS:
        for worker in _stems_workers(_render(overlay)):
            spec = worker["spec"]["template"]["spec"]
            resources = _container(worker)["resources"]
            settings = _settings_of(_render(overlay), worker)
            if settings.stemgen_device.startswith("cuda"):
                assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
                assert spec["nodeSelector"]
                assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
                assert settings.worker_concurrency >= settings.batch_max_size >= 8
            else:
                assert settings.stemgen_device == "cpu"
                assert "nvidia.com/gpu" not in resources.get("limits", {})
                assert settings.torch_num_threads == int(resources["limits"]["cpu"])
    assert any(_settings_of(_render("gpu"), w).stemgen_device == "cuda"
               for w in _stems_workers(_render("gpu")))


def test_model_cache_is_mounted_where_the_image_looks_and_spares_the_numba_cache():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    cache_dir = re.search(r"STEMGEN_CACHE_DIR=(\S+)", dockerfile).group(1)
    numba_dir = re.search(r"NUMBA_CACHE_DIR=(\S+)", dockerfile).group(1)
    for overlay in OVERLAYS:
        for worker in _stems_workers(_render(overlay)):
            mounts = {m["mountPath"] for m in _container(worker).get("volumeMounts", [])}
            assert cache_dir in mounts
            assert not any(numba_dir.startswith(m.rstrip("/") + "/") for m in mounts)


# --- KEDA --------------------------------------------------------------------------------------

def test_keda_scales_gpu_workers_from_zero_on_the_stems_queue():
    docs = _render("gpu")
    (scaled,) = _all(docs, "ScaledObject")
    target = _one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    settings = _settings_of(docs, target)
    assert settings.stemgen_device == "cuda"
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["maxReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert meta["listName"] == settings.stems_queue == Settings.model_fields["stems_queue"].default
    assert _queues(target) == [settings.stems_queue]
    # The list lives in the broker's database, on the Redis Service of this render, reached from
    # the KEDA operator's namespace by its full name.
    broker = urlsplit(settings.broker_url)
    assert broker.scheme == "redis"
    assert meta["databaseIndex"] == (broker.path.lstrip("/") or "0")
    redis_service = _one(docs, "Service", broker.hostname)
    host, port = meta["address"].rsplit(":", 1)
    namespace = redis_service["metadata"]["namespace"]
    assert host == f"{redis_service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert int(port) == broker.port == redis_service["spec"]["ports"][0]["port"]
    assert int(meta["listLength"]) >= 1
    assert scaled["spec"]["cooldownPeriod"] >= 300  # a cold start costs minutes


def test_redis_keeps_an_fsynced_append_only_file_on_a_volume():
    for overlay in OVERLAYS:
        docs = _render(overlay)
        redis = _one(docs, "StatefulSet")
        args = _container(redis)["args"]
        assert args[0] == "redis-server"
        options = dict(zip(args[1::2], args[2::2]))
        assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
        (claim,) = redis["spec"]["volumeClaimTemplates"]
        mounts = {m["name"]: m["mountPath"] for m in _container(redis)["volumeMounts"]}
        assert mounts[claim["metadata"]["name"]] == options["--dir"]
        settings = _settings_of(docs, _gateway(docs))
        for url in (settings.broker_url, settings.result_backend):
            assert urlsplit(url).hostname == _one(docs, "Service", "stemgen-redis")["metadata"]["name"]
