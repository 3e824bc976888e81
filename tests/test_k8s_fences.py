"""The fences of deploy/k8s (components fences and ingress), read from every overlay's render:
the NetworkPolicies evaluated, with Kubernetes' semantics, for the connections that must and must
not be possible; a ServiceAccount per role with no token; every container non-root, without
privilege escalation or capabilities, its root file system read-only where it can be; the Ingress
(TLS, the SSE route unbuffered with long timeouts, the gateway's request-size limit). The schemas
of these documents are checked with the others in tests/test_k8s.py."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import pytest

from stemgen_settings import Settings
from tests.test_k8s import OVERLAYS, ROOT, _all, _container, _one, _queues, _render, _settings_of, _workloads

NAMESPACE = "stemgen"
NAME_LABEL = "kubernetes.io/metadata.name"


# --- a NetworkPolicy evaluator -------------------------------------------------------------------

@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict = field(hash=False)
    ports: dict = field(hash=False, default_factory=dict)  # container port name -> number
    ip: str = "10.244.9.9"


@dataclass(frozen=True)
class Host:
    """An address outside the cluster's pods."""
    ip: str


def _selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _in_block(block: dict, ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    network = ipaddress.ip_network(block["cidr"])
    if address.version != network.version or address not in network:
        return False
    return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))


def _peer_matches(peer: dict, policy_namespace: str, other: Pod | Host) -> bool:
    if "ipBlock" in peer:
        return _in_block(peer["ipBlock"], other.ip)
    if isinstance(other, Host):
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {NAME_LABEL: other.namespace}):
            return False
    elif other.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector"), other.labels)


def _port_matches(rule_ports: list | None, destination: Pod | Host, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for item in rule_ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        wanted = item.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):  # a named port: the destination pod's container port
            wanted = destination.ports.get(wanted) if isinstance(destination, Pod) else None
        if wanted == port:
            return True
    return False


def allowed(policies: list[dict], source: Pod | Host, destination: Pod | Host, port: int,
            protocol: str = "TCP") -> bool:
    """Whether NetworkPolicies let ``source`` open ``port`` on ``destination``: egress from the
    source's pod and ingress to the destination's pod must both be allowed (a pod no policy
    selects for a direction is open in that direction)."""
    def direction(pod, kind: str, other, rule_key: str, peer_key: str) -> bool:
        if not isinstance(pod, Pod):
            return True
        selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                     and kind in p["spec"].get("policyTypes", ["Ingress"])
                     and _selects(p["spec"]["podSelector"], pod.labels)]
        if not selecting:
            return True
        return any(
            (not rule.get(peer_key) or any(_peer_matches(peer, p["metadata"]["namespace"], other)
                                           for peer in rule[peer_key]))
            and _port_matches(rule.get("ports"), destination, port, protocol)
            for p in selecting for rule in p["spec"].get(rule_key, []))

    return (direction(source, "Egress", destination, "egress", "to")
            and direction(destination, "Ingress", source, "ingress", "from"))


# --- the cluster of a render ---------------------------------------------------------------------

INGRESS_CONTROLLER = Pod("ingress-nginx-controller", "ingress-nginx",
                         {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"})
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
KEDA_OPERATOR = Pod("keda-operator", "keda", {"app.kubernetes.io/name": "keda-operator"})
KUBE_DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
STRANGER = Pod("stranger", "default", {"app": "anything"})
NEIGHBOUR = Pod("debug", NAMESPACE, {"app": "debug"})  # a pod someone started in our namespace
BLOB_ENDPOINT = Host("20.60.40.4")  # a storage account's public address
CALLBACK_TARGET = Host("203.0.113.9")
INTERNAL = [Host("10.0.0.1"), Host("10.96.0.1"), Host("172.16.4.2"), Host("192.168.1.5"),
            Host("100.64.0.10"), Host("169.254.169.254"), Host("127.0.0.1"), Host("fd00::1"), Host("fe80::1")]


def _pods(docs) -> dict[str, Pod]:
    """The render's pods by component (gateway, worker-callbacks, worker-gpu/-cpu, redis)."""
    pods = {}
    for i, workload in enumerate(_workloads(docs)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for p in _container(workload).get("ports", [])}
        pods[labels["app.kubernetes.io/component"]] = Pod(workload["metadata"]["name"], NAMESPACE,
                                                          labels, ports, f"10.244.0.{i + 10}")
    return pods


@pytest.fixture(params=OVERLAYS)
def cluster(request):
    docs = _render(request.param)
    pods = _pods(docs)
    workers = [pod for name, pod in pods.items() if name.startswith("worker-")]
    assert {"gateway", "redis", "worker-callbacks"} <= set(pods) and len(workers) == 2
    return {"docs": docs, "policies": _all(docs, "NetworkPolicy"), "pods": pods, "workers": workers}


def test_the_evaluator_opens_what_no_policy_selects_and_closes_on_a_default_deny(cluster):
    pods = cluster["pods"]
    assert allowed([], STRANGER, pods["redis"], 6379)
    deny = [p for p in cluster["policies"] if p["metadata"]["name"] == "stemgen-default-deny"]
    assert deny and deny[0]["spec"]["podSelector"] == {}
    assert not allowed(deny, pods["gateway"], pods["redis"], 6379)
    assert not allowed(deny, INGRESS_CONTROLLER, pods["gateway"], 8000)


def test_every_pod_is_fenced_in_both_directions(cluster):
    for pod in cluster["pods"].values():
        for kind in ("Ingress", "Egress"):
            assert any(kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod.labels)
                       for p in cluster["policies"]), (pod.name, kind)


def test_the_gateway_takes_requests_from_the_ingress_controller_only(cluster):
    policies, pods = cluster["policies"], cluster["pods"]
    gateway = pods["gateway"]
    port = gateway.ports["http"]
    assert allowed(policies, INGRESS_CONTROLLER, gateway, port)
    for source in (STRANGER, NEIGHBOUR, KEDA_OPERATOR, pods["redis"], *cluster["workers"]):
        assert not allowed(policies, source, gateway, port), source.name
    assert not allowed(policies, INGRESS_CONTROLLER, gateway, 9100)
    # its /metrics, on the same port, from Prometheus
    assert allowed(policies, PROMETHEUS, gateway, port)


def test_redis_takes_connections_from_the_gateway_and_the_workers_only(cluster):
    policies, pods = cluster["policies"], cluster["pods"]
    redis = pods["redis"]
    for source in (pods["gateway"], *cluster["workers"]):
        assert allowed(policies, source, redis, 6379), source.name
    # the KEDA operator reads the stems queue's length (its redis trigger)
    assert allowed(policies, KEDA_OPERATOR, redis, 6379)
    for source in (STRANGER, NEIGHBOUR, INGRESS_CONTROLLER, PROMETHEUS):
        assert not allowed(policies, source, redis, 6379), source.name
    assert not allowed(policies, pods["gateway"], redis, 6380)


def test_workers_reach_the_broker_blob_storage_dns_and_callbacks_on_443_only(cluster):
    policies, pods = cluster["policies"], cluster["pods"]
    for worker in cluster["workers"]:
        assert allowed(policies, worker, pods["redis"], 6379)
        assert allowed(policies, worker, KUBE_DNS, 53, "UDP") and allowed(policies, worker, KUBE_DNS, 53)
        assert allowed(policies, worker, BLOB_ENDPOINT, 443)
        assert allowed(policies, worker, CALLBACK_TARGET, 443)
        assert allowed(policies, worker, Host("2001:db8::7"), 443)
        for port in (80, 8080, 22):
            assert not allowed(policies, worker, CALLBACK_TARGET, port), port
        for host in INTERNAL:  # cluster-internal ranges and the metadata endpoint
            for port in (443, 80):
                assert not allowed(policies, worker, host, port), (host, port)
        for other in (pods["gateway"], PROMETHEUS, STRANGER, NEIGHBOUR, KUBE_DNS):
            assert not allowed(policies, worker, other, 443), other.name
        assert not allowed(policies, worker, KUBE_DNS, 9153)


def test_the_gateway_and_redis_reach_nothing_else(cluster):
    policies, pods = cluster["policies"], cluster["pods"]
    gateway, redis = pods["gateway"], pods["redis"]
    assert allowed(policies, gateway, BLOB_ENDPOINT, 443)  # readiness checks the storage account
    assert allowed(policies, gateway, KUBE_DNS, 53, "UDP")
    for host in INTERNAL:
        assert not allowed(policies, gateway, host, 443), host
    for worker in cluster["workers"]:
        assert not allowed(policies, gateway, worker, worker.ports["metrics"])
    assert allowed(policies, redis, KUBE_DNS, 53, "UDP")
    for destination in (BLOB_ENDPOINT, CALLBACK_TARGET, gateway, *cluster["workers"]):
        assert not allowed(policies, redis, destination, 443)


def test_metrics_ports_answer_the_monitoring_namespace_only(cluster):
    policies = cluster["policies"]
    for worker in cluster["workers"]:
        port = worker.ports["metrics"]
        assert port == Settings.model_fields["worker_metrics_port"].default
        assert allowed(policies, PROMETHEUS, worker, port)
        for source in (STRANGER, NEIGHBOUR, INGRESS_CONTROLLER, KEDA_OPERATOR, cluster["pods"]["gateway"],
                       Pod("prometheus", "observability", PROMETHEUS.labels)):
            assert not allowed(policies, source, worker, port), source.name


# --- service accounts and security contexts ------------------------------------------------------

def _role(workload: dict, docs) -> str:
    queues = _queues(workload)
    if queues is None:
        return workload["metadata"]["name"]
    settings = _settings_of(docs, workload)
    return "generation" if settings.stems_queue in queues else "callbacks"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_has_its_own_service_account_without_a_token(overlay):
    docs = _render(overlay)
    accounts = {a["metadata"]["name"]: a for a in _all(docs, "ServiceAccount")}
    by_role = {}
    for workload in _workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        name = spec.get("serviceAccountName")
        assert name in accounts, workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        assert accounts[name]["automountServiceAccountToken"] is False
        by_role.setdefault(_role(workload, docs), set()).add(name)
    assert all(len(names) == 1 for names in by_role.values())
    assert len(set().union(*by_role.values())) == len(by_role)  # no account shared by two roles
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_non_root_without_privileges(overlay):
    docs = _render(overlay)
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    numba_dir = re.search(r"NUMBA_CACHE_DIR=(\S+)", dockerfile).group(1)
    for workload in _workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        pod_context = spec["securityContext"]
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
            assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert not context.get("privileged")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if _role(workload, docs) == "generation":
                # numba's cache in the image must stay readable and writable (fences/generation-worker.yaml)
                assert context["readOnlyRootFilesystem"] is False
                continue
            assert context["readOnlyRootFilesystem"] is True, workload["metadata"]["name"]
            if _queues(workload) is not None or "gunicorn" in container.get("command", []):
                assert "emptyDir" in volumes[mounts["/tmp"]]  # gunicorn's and Celery's temporary files
            if _queues(workload) is not None:
                assert "emptyDir" in volumes[mounts[numba_dir]]


# --- the Ingress ---------------------------------------------------------------------------------

def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", size).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit.lower()]


def _events_rule() -> str:
    from api import create_app
    from tests.api.test_routes import FakeService

    app = create_app(Settings(_env_file=None), service=FakeService())
    (rule,) = [r.rule for r in app.url_map.iter_rules() if r.rule.endswith("/events")]
    return rule


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_terminates_tls_streams_events_and_limits_bodies_as_the_gateway(overlay):
    docs = _render(overlay)
    ingresses = _all(docs, "Ingress")
    assert ingresses and all(i["apiVersion"] == "networking.k8s.io/v1" for i in ingresses)
    gateway_service = _one(docs, "Service", "stemgen-gateway")
    service_ports = {p["name"] for p in gateway_service["spec"]["ports"]}
    limit = Settings(_env_file=None, **{k.lower(): v for k, v in
                                        _one_config(docs).items()}).max_request_bytes
    events_path = _events_rule().replace("<job_id>", "3f2a9c")
    streaming = []
    for ingress in ingresses:
        spec, annotations = ingress["spec"], ingress["metadata"]["annotations"]
        hosts = {rule["host"] for rule in spec["rules"]}
        assert {h for tls in spec["tls"] for h in tls["hosts"]} == hosts
        assert all(tls["secretName"] for tls in spec["tls"])
        assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
        assert _bytes(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == limit
        for rule in spec["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "stemgen-gateway" and backend["port"]["name"] in service_ports
                if path["pathType"] == "ImplementationSpecific":
                    assert annotations["nginx.ingress.kubernetes.io/use-regex"] == "true"
                    if re.fullmatch(path["path"], events_path):
                        streaming.append(annotations)
                    assert not re.fullmatch(path["path"], "/jobs/3f2a9c")
    (sse,) = streaming
    assert sse["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(sse["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(sse["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600


def _one_config(docs) -> dict:
    (config,) = [d for d in _all(docs, "ConfigMap") if d["metadata"]["name"].startswith("stemgen-config")]
    return config["data"]


def test_cert_manager_issues_the_certificate_in_the_production_overlay():
    docs = _render("production")
    main = _one(docs, "Ingress", "stemgen")
    assert main["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    secrets = {tls["secretName"] for i in _all(docs, "Ingress") for tls in i["spec"]["tls"]}
    assert secrets == {"stemgen-tls"}  # one certificate for the host, used by both Ingresses
    for overlay in ("gpu", "cpu-only"):
        assert all("cert-manager.io/cluster-issuer" not in i["metadata"]["annotations"]
                   for i in _all(_render(overlay), "Ingress"))
