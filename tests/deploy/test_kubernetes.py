"""Static checks of the Kubernetes manifests in ``deploy/kubernetes/``.

There is no cluster (and no network) on the test machines, and check-jsonschema vendors
no Kubernetes schemas, so nothing is applied or schema-validated: every manifest is
parsed (multi-document aware), the kinds and API versions are pinned, the few type rules
a schema would catch and that bite in practice are checked (env values, labels and
annotations must be strings), and the facts the worker depends on are asserted against
the sources they come from: Dockerfile.worker's USER, the routes of
worker/http_server.py, the metric names of worker/metrics.py, the project version.

The control API (``campaign-worker api``) is a second Deployment of the same image with
its own Service and Secret; its facts are checked against worker/api/server.py and the
settings.

``kubectl apply -k deploy/kubernetes`` must need nothing but Kubernetes: the KEDA
ScaledObject is an optional kustomize Component in ``keda/``. When ``kubectl`` is
installed, both ways are rendered for real with ``kubectl kustomize`` (no cluster needed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile.worker"
PYPROJECT = ROOT / "pyproject.toml"
METRICS_PY = ROOT / "worker" / "metrics.py"
HTTP_SERVER_PY = ROOT / "worker" / "http_server.py"
API_SERVER_PY = ROOT / "worker" / "api" / "server.py"
WORKER_DIR = ROOT / "worker"

KUSTOMIZATION = "kustomization.yaml"
EXAMPLE_SECRET = "redis-secret.example.yaml"
API_EXAMPLE_SECRET = "api-secret.example.yaml"
API_DEPLOYMENT = "api-deployment.yaml"
API_SERVICE = "api-service.yaml"
KEDA_DIR = "keda"
KEDA_COMPONENT = f"{KEDA_DIR}/kustomization.yaml"
SCALED_OBJECT = f"{KEDA_DIR}/scaledobject.yaml"
K8S_README = K8S / "README.md"

# file -> (apiVersion, kind) of each of its documents, in order
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "worker-deployment.yaml": [("apps/v1", "Deployment")],
    "worker-pdb.yaml": [("policy/v1", "PodDisruptionBudget")],
    "worker-metrics-service.yaml": [("v1", "Service")],
    EXAMPLE_SECRET: [("v1", "Secret")],
    API_DEPLOYMENT: [("apps/v1", "Deployment")],
    API_SERVICE: [("v1", "Service")],
    API_EXAMPLE_SECRET: [("v1", "Secret")],
    KUSTOMIZATION: [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
    SCALED_OBJECT: [("keda.sh/v1alpha1", "ScaledObject")],
    KEDA_COMPONENT: [("kustomize.config.k8s.io/v1alpha1", "Component")],
}
KUSTOMIZE_FILES = {KUSTOMIZATION, KEDA_COMPONENT}

WORKER = "campaign-worker"
IMAGE_REPO = "campaign-scheduler/worker"  # the placeholder kustomization.yaml's images: replaces
PLACEHOLDER_REGISTRY_IMAGE = "registry.example.com/campaign-worker"
HTTP_PORT = 8080
API = "campaign-api"
API_PORT = 8000
EXAMPLE_REDIS_URL = "rediss://default:CHANGE-ME@redis.example:6380/0"

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


# --------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file; each must be a mapping."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping: {doc!r}"
    return docs


def the_one(filename: str, kind: str) -> dict[str, Any]:
    """The single document of ``kind`` in ``filename``."""
    found = [d for d in load_docs(K8S / filename) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {filename}, found {len(found)}"
    return found[0]


def manifest_files() -> list[str]:
    """Every YAML file under deploy/kubernetes, as a path relative to it."""
    return sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*.y*ml"))


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: the kustomize rendering is not checked")
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize directory``: what ``kubectl apply -k`` would send."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def commented_block(text: str, key: str) -> list[str]:
    """The lines of a commented-out YAML block starting ``# key:`` (uncommented)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln == f"# {key}:")
    block = [lines[start][2:]]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    return block


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``250m``, ``1``, ``512Mi``, ``1G``) as a number."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value).strip())
    assert m is not None, f"bad quantity {value!r}"
    factor = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }[m.group(2)]
    return float(m.group(1)) * factor


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether an equality selector (matchLabels) matches a label set."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def dockerfile_user(text: str) -> tuple[str, str | None]:
    """The last ``USER`` of the final stage: (user, group or None)."""
    final = re.split(r"(?im)^[ \t]*FROM[ \t]", text)[-1]
    users = re.findall(r"(?im)^[ \t]*USER[ \t]+(\S+)[ \t]*$", final)
    assert users, "the final stage of Dockerfile.worker has no USER"
    user, sep, group = users[-1].partition(":")
    return user, (group if sep else None)


def source_metric_names() -> set[str]:
    """Metric family names defined (as string literals) in worker/metrics.py."""
    return set(re.findall(r"[\"'](campaign_[a-z0-9_]+)[\"']", METRICS_PY.read_text()))


def http_routes(source: Path = HTTP_SERVER_PY) -> set[str]:
    """GET routes of the worker's HTTP server (or of another aiohttp server module)."""
    return set(re.findall(r"add_get\(\s*[\"']([^\"']+)[\"']", source.read_text()))


def service_link_variables(service: dict[str, Any]) -> set[str]:
    """The variables Kubernetes puts in every pod of the namespace for a Service when
    service links are on (the default): NAME_SERVICE_HOST, NAME_PORT, NAME_PORT_8000_TCP..."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    out = {f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT", f"{name}_PORT"}
    for port in service["spec"]["ports"]:
        proto = port.get("protocol", "TCP").upper()
        if port.get("name"):
            out.add(f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        base = f"{name}_PORT_{port['port']}_{proto}"
        out |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
    return out


def settings_variables() -> set[str]:
    """Every environment variable the settings read (REDIS_URL, CAMPAIGN_*)."""
    from app.settings import Settings

    special = {"redis_url", "sentry_dsn"}
    return {f.upper() if f in special else f"CAMPAIGN_{f.upper()}" for f in Settings.model_fields}


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = container.get("env") or []
    names = [e["name"] for e in entries]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"env variables set twice: {sorted(dupes)}"
    return {e["name"]: e for e in entries}


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or container port name) as a number."""
    if isinstance(port, int):
        return port
    named = [p for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return int(named[0]["containerPort"])


_POD_LEVEL = ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")


def effective_security(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's security context with the pod-level defaults it inherits."""
    pod_sc = pod.get("securityContext") or {}
    merged = {k: pod_sc[k] for k in _POD_LEVEL if k in pod_sc}
    merged.update(container.get("securityContext") or {})
    return merged


def promql_aggregation(query: str) -> tuple[str, str]:
    """``(outer aggregation operator, its argument)`` of ``op [by|without (...)] (expr)``."""
    m = re.fullmatch(
        r"\s*([a-z_]+)\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\((.*)\)\s*"
        r"(?:(?:by|without)\s*\([^)]*\)\s*)?",
        query,
        re.DOTALL,
    )
    assert m is not None, f"query is not one aggregation: {query!r}"
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return the_one("worker-deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert len(containers) == 1, "expected exactly one container (the worker)"
    c: dict[str, Any] = containers[0]
    return c


@pytest.fixture(scope="module")
def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return env_map(container)


@pytest.fixture(scope="module")
def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.fixture(scope="module")
def selector(deployment: dict[str, Any]) -> dict[str, str]:
    sel = deployment["spec"]["selector"]
    assert set(sel) == {"matchLabels"}, "use matchLabels only (the PDB/Service tests rely on it)"
    labels: dict[str, str] = sel["matchLabels"]
    return labels


@pytest.fixture(scope="module")
def pdb() -> dict[str, Any]:
    return the_one("worker-pdb.yaml", "PodDisruptionBudget")


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return the_one("worker-metrics-service.yaml", "Service")


@pytest.fixture(scope="module")
def scaled_object() -> dict[str, Any]:
    return the_one(SCALED_OBJECT, "ScaledObject")


@pytest.fixture(scope="module")
def trigger(scaled_object: dict[str, Any]) -> dict[str, Any]:
    triggers = scaled_object["spec"]["triggers"]
    assert len(triggers) == 1, "expected one trigger (prometheus)"
    t: dict[str, Any] = triggers[0]
    return t


# --------------------------------------------------------------------------- files


def test_manifest_files_are_the_expected_ones() -> None:
    assert K8S.is_dir(), f"{K8S} is missing"
    assert manifest_files() == sorted(EXPECTED), "a manifest was added or removed: update EXPECTED"


@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_manifest_parses_with_expected_kinds(filename: str) -> None:
    docs = load_docs(K8S / filename)
    assert [(d.get("apiVersion"), d.get("kind")) for d in docs] == EXPECTED[filename]


@pytest.mark.parametrize("filename", sorted(set(EXPECTED) - KUSTOMIZE_FILES))
def test_resource_metadata_is_well_formed(filename: str) -> None:
    """What the API server's schema would reject: names, non-string labels/annotations."""
    for doc in load_docs(K8S / filename):
        meta = doc["metadata"]
        assert "namespace" not in meta, "leave the namespace to kubectl -n / kustomize"
        name = meta["name"]
        assert len(name) <= 63 and _DNS1123_LABEL.fullmatch(name), f"bad name {name!r}"
        maps = [meta.get("labels") or {}, meta.get("annotations") or {}]
        template = (doc.get("spec") or {}).get("template", {}).get("metadata", {})
        maps += [template.get("labels") or {}, template.get("annotations") or {}]
        for mapping in maps:
            for key, value in mapping.items():
                assert isinstance(value, str), f"{filename}: {key}: {value!r} must be a string"
                prefix, _, _ = key.rpartition("/")
                assert not prefix or _DNS1123_SUBDOMAIN.fullmatch(prefix), key


def test_kustomization_lists_every_manifest_except_the_example_and_keda() -> None:
    kustomization = the_one(KUSTOMIZATION, "Kustomization")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    expected = {
        f for f in manifest_files() if "/" not in f and f != KUSTOMIZATION and ".example." not in f
    }
    assert set(resources) == expected
    assert EXAMPLE_SECRET not in resources, "the example Secret must never be applied"
    for res in resources:
        assert (K8S / res).is_file(), f"kustomization lists a missing file {res!r}"


def test_apply_k_needs_no_keda() -> None:
    """Nothing that `kubectl apply -k deploy/kubernetes` sends needs a CRD: KEDA is a
    component left out by default (listed only in a comment)."""
    kustomization = the_one(KUSTOMIZATION, "Kustomization")
    assert "components" not in kustomization, "KEDA must stay optional"
    assert not any("keda" in r.lower() for r in kustomization["resources"])
    enabled = yaml.safe_load(
        "\n".join(commented_block((K8S / KUSTOMIZATION).read_text(), "components"))
    )
    assert enabled == {"components": [KEDA_DIR]}, "the commented components: must name keda"
    component = the_one(KEDA_COMPONENT, "Component")
    assert component["resources"] == [SCALED_OBJECT.removeprefix(f"{KEDA_DIR}/")]
    comments = (K8S / KEDA_COMPONENT).read_text()
    assert "kustomize edit add component keda" in comments
    assert "kubectl apply -f deploy/kubernetes/keda/scaledobject.yaml" in comments


def test_kustomization_images_entry_replaces_the_placeholder(deployment: dict[str, Any]) -> None:
    """The image the manifests run is the one the README builds and pushes, set in one place."""
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    name, _, tag = c["image"].rpartition(":")
    (entry,) = the_one(KUSTOMIZATION, "Kustomization")["images"]
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert entry == {"name": name, "newName": PLACEHOLDER_REGISTRY_IMAGE, "newTag": version}
    assert tag == version
    comments = (K8S / KUSTOMIZATION).read_text()
    assert f"kustomize edit set image {name}=REGISTRY/campaign-worker:TAG" in comments


def test_readme_gives_the_build_push_and_apply_steps(deployment: dict[str, Any]) -> None:
    text = K8S_README.read_text()
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    name = c["image"].rpartition(":")[0]
    for step in (
        'docker build -f Dockerfile.worker -t "$REGISTRY/campaign-worker:$TAG" .',
        'docker push "$REGISTRY/campaign-worker:$TAG"',
        f'kustomize edit set image "{name}=$REGISTRY/campaign-worker:$TAG"',
        "kubectl create secret generic campaign-redis",
        "kubectl apply -k deploy/kubernetes",
        "kustomize edit add component keda",
    ):
        assert step in text, f"deploy/kubernetes/README.md lost the step {step!r}"
    assert (ROOT / "Dockerfile.worker").is_file()
    assert "Dockerfile.worker" in (K8S / KUSTOMIZATION).read_text()


def test_rendered_base_has_no_crd_and_runs_the_pushed_image() -> None:
    docs = render(K8S)
    kinds = sorted((d["apiVersion"], d["kind"]) for d in docs)
    assert kinds == [("apps/v1", "Deployment"), ("apps/v1", "Deployment"),
                     ("policy/v1", "PodDisruptionBudget"), ("v1", "Service"),
                     ("v1", "Service")]  # fmt: skip
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {WORKER, API}
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    for dep in deployments.values():
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"{PLACEHOLDER_REGISTRY_IMAGE}:{version}", dep["metadata"]["name"]
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret would be applied"


def test_rendered_with_the_keda_component(tmp_path: Path) -> None:
    """The documented by-hand way: uncomment `components:` in kustomization.yaml."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    text = (copy / KUSTOMIZATION).read_text()
    block = commented_block(text, "components")
    commented = "\n".join("# " + line for line in block)
    assert commented in text
    (copy / KUSTOMIZATION).write_text(text.replace(commented, "\n".join(block)))
    docs = render(copy)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "Deployment", "Deployment", "PodDisruptionBudget", "ScaledObject", "Service", "Service",
    ]  # fmt: skip
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == WORKER]
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]


# --------------------------------------------------------------------------- Deployment


def test_deployment_name_replicas_and_image(deployment: dict[str, Any]) -> None:
    assert deployment["metadata"]["name"] == WORKER
    assert deployment["spec"]["replicas"] == 2
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"{IMAGE_REPO}:{version}", "image tag must be the project version"


def test_deployment_selector_matches_its_pods(
    selector: dict[str, str], pod_labels: dict[str, str]
) -> None:
    assert selects(selector, pod_labels)
    # The Prometheus pod discovery documented in deploy/prometheus/prometheus.yml keys on it.
    assert pod_labels.get("app.kubernetes.io/name") == WORKER


def test_container_port_is_http_8080(
    container: dict[str, Any], env: dict[str, dict[str, Any]]
) -> None:
    ports = container["ports"]
    assert [(p.get("name"), p.get("containerPort")) for p in ports] == [("http", HTTP_PORT)]
    if "CAMPAIGN_HTTP_PORT" in env:
        assert env["CAMPAIGN_HTTP_PORT"].get("value") == str(HTTP_PORT)
    assert re.search(rf"(?m)^\s*EXPOSE\s+{HTTP_PORT}\b", DOCKERFILE.read_text())


@pytest.mark.parametrize(
    ("probe", "path"),
    [("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")],
)
def test_probe_path_and_port(container: dict[str, Any], probe: str, path: str) -> None:
    assert probe in container, f"{probe} missing"
    get = container[probe].get("httpGet")
    assert get is not None, f"{probe} is not an HTTP GET"
    assert get["path"] == path
    assert get["path"] in http_routes(), f"the worker serves no {get['path']}"
    assert container_port(container, get["port"]) == HTTP_PORT
    assert get.get("scheme", "HTTP") == "HTTP"


def test_liveness_never_checks_redis(container: dict[str, Any]) -> None:
    """/readyz pings Redis: in liveness it would restart every worker during an outage."""
    for probe in ("livenessProbe", "startupProbe"):
        assert "readyz" not in container[probe]["httpGet"]["path"], probe
    assert container["livenessProbe"].get("failureThreshold", 3) >= 2, "one slow answer restarts"


def test_readiness_timeout_exceeds_the_redis_ping(container: dict[str, Any]) -> None:
    m = re.search(r"wait_for\(\s*redis_probe\(\)\s*,\s*([0-9.]+)\s*\)", HTTP_SERVER_PY.read_text())
    assert m is not None, "the Redis ping timeout of /readyz was not found in http_server.py"
    timeout = container["readinessProbe"].get("timeoutSeconds", 1)
    assert timeout > float(m.group(1)), "a slow but healthy Redis would flip readiness"


def test_termination_grace_exceeds_shutdown_grace(
    pod: dict[str, Any], container: dict[str, Any], env: dict[str, dict[str, Any]]
) -> None:
    grace = float(env["CAMPAIGN_SHUTDOWN_GRACE"]["value"])
    assert grace == 20
    termination = pod["terminationGracePeriodSeconds"]
    assert termination == 30
    assert termination > grace, "SIGKILL would cut the drain short"
    # A preStop hook runs before SIGTERM and eats into the same budget.
    assert "preStop" not in (container.get("lifecycle") or {})


def test_env_values_are_strings(container: dict[str, Any]) -> None:
    for entry in container["env"]:
        assert ("value" in entry) != ("valueFrom" in entry), entry
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{entry['name']}: quote {entry['value']!r}"


def test_environment(env: dict[str, dict[str, Any]]) -> None:
    assert env["CAMPAIGN_LOG_FORMAT"]["value"] == "json"
    assert env["OTEL_SERVICE_NAME"]["value"] == WORKER
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"])
    assert endpoint.scheme == "http"
    assert (endpoint.hostname, endpoint.port) == ("otel-collector", 4318)
    assert endpoint.path in {"", "/"}, "the SDK appends /v1/traces itself"


def test_redis_url_comes_from_a_secret(
    container: dict[str, Any], env: dict[str, dict[str, Any]]
) -> None:
    entry = env["REDIS_URL"]
    assert "value" not in entry, "REDIS_URL must not be a literal (it holds a password)"
    ref = entry["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("campaign-redis", "url")
    assert ref.get("optional") is not True, "a missing Secret would mean redis://localhost"
    assert "CAMPAIGN_REDIS_URL" not in env, "the settings alias would hide where it comes from"
    assert "envFrom" not in container
    for e in container["env"]:
        assert not re.search(r"rediss?://", str(e.get("value", ""))), f"literal URL in {e}"


def test_security_context(pod: dict[str, Any], container: dict[str, Any]) -> None:
    sc = effective_security(pod, container)
    assert sc.get("runAsNonRoot") is True
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    caps = sc.get("capabilities") or {}
    assert caps.get("drop") == ["ALL"]
    assert not caps.get("add"), "no capability may be added back"
    assert (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"
    assert pod.get("hostNetwork", False) is False and pod.get("hostPID", False) is False
    assert pod.get("automountServiceAccountToken") is False, "the worker never calls the API"


def test_run_as_user_matches_the_dockerfile(pod: dict[str, Any], container: dict[str, Any]) -> None:
    user, group = dockerfile_user(DOCKERFILE.read_text())
    assert user.isdigit(), "runAsNonRoot can only verify a numeric USER"
    sc = effective_security(pod, container)
    assert sc["runAsUser"] == int(user) == 10001
    assert int(user) != 0
    if group is not None:
        assert sc.get("runAsGroup", int(group)) == int(group)


def test_read_only_root_has_a_writable_tmp(pod: dict[str, Any], container: dict[str, Any]) -> None:
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts, "nothing writable at /tmp on a read-only root"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
    assert "emptyDir" in volume
    assert volume["emptyDir"].get("sizeLimit"), "an unbounded emptyDir can fill the node"


def test_resources_requests_and_limits(container: dict[str, Any]) -> None:
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind) or {}), f"{kind} incomplete"
    for res in ("cpu", "memory"):
        request = parse_quantity(resources["requests"][res])
        limit = parse_quantity(resources["limits"][res])
        assert 0 < request <= limit, f"{res}: request {request} > limit {limit}"
    assert parse_quantity(resources["limits"]["memory"]) >= 256 * 2**20


def test_service_links_disabled(pod: dict[str, Any]) -> None:
    """Service links inject {SERVICE}_PORT variables, which can shadow CAMPAIGN_* settings."""
    assert pod.get("enableServiceLinks") is False


def test_prometheus_scrape_annotations(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert int(annotations["prometheus.io/port"]) in [
        p["containerPort"] for p in container["ports"]
    ]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/path"] in http_routes()


# --------------------------------------------------------------------------- PDB and Service


def test_pdb_keeps_one_worker(
    pdb: dict[str, Any], deployment: dict[str, Any], selector: dict[str, str]
) -> None:
    spec = pdb["spec"]
    assert spec["minAvailable"] == 1
    assert "maxUnavailable" not in spec
    assert spec["minAvailable"] < deployment["spec"]["replicas"], "would block every drain"
    assert spec["selector"] == {"matchLabels": selector}
    assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", (
        "readiness follows Redis: during an outage the default would block every eviction"
    )


def test_pdb_selects_the_deployment_pods(pdb: dict[str, Any], pod_labels: dict[str, str]) -> None:
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_metrics_service(
    service: dict[str, Any],
    selector: dict[str, str],
    pod_labels: dict[str, str],
    container: dict[str, Any],
) -> None:
    assert service["metadata"]["name"] == "campaign-worker-metrics"
    spec = service["spec"]
    assert spec["selector"] == selector
    assert selects(spec["selector"], pod_labels)
    (port,) = spec["ports"]
    assert port["port"] == HTTP_PORT
    assert container_port(container, port.get("targetPort", port["port"])) == HTTP_PORT
    assert spec.get("publishNotReadyAddresses") is True, "scrape workers while Redis is down"
    assert spec.get("type", "ClusterIP") == "ClusterIP", "metrics must not be exposed outside"


# --------------------------------------------------------------------------- KEDA


def test_scaled_object_targets_the_deployment(
    scaled_object: dict[str, Any], deployment: dict[str, Any]
) -> None:
    spec = scaled_object["spec"]
    ref = spec["scaleTargetRef"]
    assert ref["name"] == deployment["metadata"]["name"]
    assert ref.get("kind", "Deployment") == "Deployment"
    assert ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert spec["minReplicaCount"] == 1, "never 0: deferred jobs need a poller"
    assert spec["maxReplicaCount"] == 10
    assert spec["minReplicaCount"] <= deployment["spec"]["replicas"] <= spec["maxReplicaCount"]


def test_keda_trigger_is_prometheus_with_string_metadata(trigger: dict[str, Any]) -> None:
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    for key, value in meta.items():
        assert isinstance(value, str), f"KEDA trigger metadata {key}: {value!r} must be a string"
    assert {"serverAddress", "query", "threshold"} <= set(meta)
    assert urlsplit(meta["serverAddress"]).scheme in {"http", "https"}
    assert float(meta["threshold"]) > 0


def test_keda_query_takes_the_max_of_the_queue_depth(trigger: dict[str, Any]) -> None:
    query = trigger["metadata"]["query"]
    op, inner = promql_aggregation(query)
    assert op == "max", f"campaign_queue_jobs is queue-wide: aggregate with max, not {op}"
    assert not re.search(r"\b(sum|avg|count)\b", query), "queue-wide gauge: never sum"
    assert "(" not in inner, f"one selector inside max(): {inner!r}"
    names = set(re.findall(r"\b(campaign_[a-z0-9_]+)\b", query))
    assert "campaign_queue_jobs" in names
    missing = names - source_metric_names()
    assert not missing, f"not defined in worker/metrics.py: {sorted(missing)}"
    states = re.findall(r'state\s*=\s*"([^"]+)"', query)
    assert states == ["due"]
    worker_source = "\n".join(p.read_text() for p in sorted(WORKER_DIR.glob("*.py")))
    for state in states:
        assert f'state="{state}"' in worker_source, f"no worker exports state={state!r}"


def test_keda_file_explains_why_not_the_redis_scaler() -> None:
    text = (K8S / SCALED_OBJECT).read_text().lower()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "sorted set" in comments and "redis" in comments


# --------------------------------------------------------------------------- example Secret


def test_example_secret(env: dict[str, dict[str, Any]]) -> None:
    text = (K8S / EXAMPLE_SECRET).read_text()
    assert re.search(r"(?m)^#.*\bEXAMPLE\b", text), "mark the file as an example at the top"
    secret = the_one(EXAMPLE_SECRET, "Secret")
    ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert secret["metadata"]["name"] == ref["name"]
    assert "data" not in secret, "stringData only: no base64 to hide a real password in"
    url = secret["stringData"][ref["key"]]
    assert url == EXAMPLE_REDIS_URL
    assert "CHANGE-ME" in url


def test_example_secret_url_is_accepted_by_the_settings() -> None:
    from app.settings import Settings

    url = the_one(EXAMPLE_SECRET, "Secret")["stringData"]["url"]
    settings = Settings.load(REDIS_URL=url)
    assert settings.redis_url.get_secret_value() == url
    assert "CHANGE-ME" not in settings.redacted_redis_url()


# --------------------------------------------------------------------------- control API


@pytest.fixture(scope="module")
def api_deployment() -> dict[str, Any]:
    return the_one(API_DEPLOYMENT, "Deployment")


@pytest.fixture(scope="module")
def api_pod(api_deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = api_deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def api_container(api_pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = api_pod["containers"]
    assert isinstance(c, dict)
    return c


@pytest.fixture(scope="module")
def api_env(api_container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return env_map(api_container)


@pytest.fixture(scope="module")
def api_service() -> dict[str, Any]:
    return the_one(API_SERVICE, "Service")


def test_api_deployment_runs_the_worker_image_with_the_api_command(
    api_deployment: dict[str, Any], api_container: dict[str, Any], container: dict[str, Any]
) -> None:
    assert api_deployment["metadata"]["name"] == API
    assert api_deployment["spec"]["replicas"] == 2
    assert api_container["image"] == container["image"], "one image, set once in images:"
    # `command` replaces the image's ENTRYPOINT (there is none) and its CMD (`run`).
    assert api_container["command"] == ["campaign-worker", "api"]
    assert "args" not in api_container
    assert not re.search(r"(?m)^\s*ENTRYPOINT\b", DOCKERFILE.read_text())


def test_api_selector_and_labels_are_its_own(
    api_deployment: dict[str, Any], deployment: dict[str, Any], pdb: dict[str, Any],
    service: dict[str, Any], api_service: dict[str, Any],
) -> None:  # fmt: skip
    """The worker's PDB and metrics Service never select API pods, nor the reverse."""
    api_selector = api_deployment["spec"]["selector"]["matchLabels"]
    api_labels = api_deployment["spec"]["template"]["metadata"]["labels"]
    worker_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert set(api_deployment["spec"]["selector"]) == {"matchLabels"}
    assert selects(api_selector, api_labels)
    assert api_labels["app.kubernetes.io/name"] == API
    for worker_selector in (pdb["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert not selects(worker_selector, api_labels)
    assert not selects(api_service["spec"]["selector"], worker_labels)
    assert not selects(api_selector, worker_labels)


def test_api_listens_on_all_interfaces_port_8000(
    api_container: dict[str, Any], api_env: dict[str, dict[str, Any]]
) -> None:
    ports = api_container["ports"]
    assert [(p.get("name"), p.get("containerPort")) for p in ports] == [("http", API_PORT)]
    assert api_env["CAMPAIGN_API_PORT"]["value"] == str(API_PORT)
    assert api_env["CAMPAIGN_API_HOST"]["value"] == "0.0.0.0", "127.0.0.1 is unreachable"


@pytest.mark.parametrize(
    ("probe", "path"),
    [("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")],
)
def test_api_probe_path_and_port(api_container: dict[str, Any], probe: str, path: str) -> None:
    get = api_container[probe].get("httpGet")
    assert get is not None, f"{probe} is not an HTTP GET"
    assert get["path"] == path
    assert path in http_routes(API_SERVER_PY), f"the API serves no {path}"
    assert container_port(api_container, get["port"]) == API_PORT
    assert get.get("scheme", "HTTP") == "HTTP"
    assert api_container["livenessProbe"].get("failureThreshold", 3) >= 2


def test_api_readiness_timeout_exceeds_its_redis_ping(api_container: dict[str, Any]) -> None:
    m = re.search(r"wait_for\(\s*client\.redis\.ping\(\)\s*,\s*([0-9.]+)\s*\)",
                  API_SERVER_PY.read_text())  # fmt: skip
    assert m is not None, "the Redis ping timeout of /readyz was not found in api/server.py"
    timeout = api_container["readinessProbe"].get("timeoutSeconds", 1)
    assert timeout > float(m.group(1)), "a slow but healthy Redis would flip readiness"


def test_api_tokens_and_redis_url_come_from_secrets(
    api_container: dict[str, Any], api_env: dict[str, dict[str, Any]],
    env: dict[str, dict[str, Any]],
) -> None:  # fmt: skip
    tokens = api_env["CAMPAIGN_API_TOKENS"]
    assert "value" not in tokens, "tokens must never be a literal in the manifest"
    ref = tokens["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("campaign-api", "tokens")
    assert ref.get("optional") is not True, "without tokens the API exits 2"
    redis = api_env["REDIS_URL"]
    assert "value" not in redis
    assert redis["valueFrom"] == env["REDIS_URL"]["valueFrom"], "the workers' Redis Secret"
    assert "envFrom" not in api_container
    for e in api_container["env"]:
        assert not re.search(r"rediss?://", str(e.get("value", ""))), f"literal URL in {e}"


def test_api_env_values_are_strings_and_accepted_by_the_settings(
    api_container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import Settings

    for entry in api_container["env"]:
        assert ("value" in entry) != ("valueFrom" in entry), entry
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{entry['name']}: quote {entry['value']!r}"
            if entry["name"].startswith("CAMPAIGN_"):
                monkeypatch.setenv(entry["name"], entry["value"])
    monkeypatch.setenv("CAMPAIGN_API_TOKENS", "a-stand-in-token-of-32-characters")
    settings = Settings.load()
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", API_PORT)
    assert "{trace_id}" in settings.trace_url


def test_api_environment(
    api_env: dict[str, dict[str, Any]], env: dict[str, dict[str, Any]]
) -> None:
    assert api_env["OTEL_SERVICE_NAME"]["value"] == API
    assert api_env["CAMPAIGN_LOG_FORMAT"]["value"] == "json"
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        assert api_env[name] == env[name], f"{name}: the workers' collector"
    trace_url = urlsplit(api_env["CAMPAIGN_TRACE_URL"]["value"].replace("{trace_id}", "x"))
    assert trace_url.scheme in {"http", "https"}


def test_api_security_context_is_the_workers(
    api_pod: dict[str, Any], api_container: dict[str, Any],
    pod: dict[str, Any], container: dict[str, Any],
) -> None:  # fmt: skip
    assert effective_security(api_pod, api_container) == effective_security(pod, container)
    assert api_pod.get("automountServiceAccountToken") is False
    assert api_pod.get("enableServiceLinks") is False
    assert api_pod.get("hostNetwork", False) is False
    mounts = {m["mountPath"]: m["name"] for m in api_container.get("volumeMounts", [])}
    volume = next(v for v in api_pod["volumes"] if v["name"] == mounts["/tmp"])
    assert volume["emptyDir"].get("sizeLimit")


def test_api_resources(api_container: dict[str, Any]) -> None:
    resources = api_container["resources"]
    for res in ("cpu", "memory"):
        request = parse_quantity(resources["requests"][res])
        limit = parse_quantity(resources["limits"][res])
        assert 0 < request <= limit, f"{res}: request {request} > limit {limit}"
    assert parse_quantity(resources["limits"]["memory"]) >= 256 * 2**20


def test_api_has_no_scrape_annotations(api_deployment: dict[str, Any]) -> None:
    """Annotation-based discovery would scrape the API under the workers' job, which the
    worker alerts match: the API gets a job of its own in prometheus.yml."""
    annotations = api_deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert not [k for k in annotations if k.startswith("prometheus.io/")]
    assert (
        "job_name: campaign-api" in (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    )


def test_api_service(
    api_service: dict[str, Any], api_deployment: dict[str, Any], api_container: dict[str, Any]
) -> None:
    spec = api_service["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP", "not exposed outside the cluster"
    assert spec["selector"] == api_deployment["spec"]["selector"]["matchLabels"]
    (port,) = spec["ports"]
    assert port["port"] == API_PORT
    assert container_port(api_container, port.get("targetPort", port["port"])) == API_PORT
    assert "clusterIP" not in spec, "a headless Service would not balance requests"


def test_no_service_injects_a_setting() -> None:
    """With service links (on by default in other pods of the namespace, e.g. your own API
    using the Python client), a Service named `campaign-api` would inject
    CAMPAIGN_API_PORT=tcp://...: a bad setting that stops that process."""
    settings = settings_variables()
    assert "CAMPAIGN_API_PORT" in settings
    services = [
        d for f in manifest_files() for d in load_docs(K8S / f) if d.get("kind") == "Service"
    ]
    assert len(services) >= 2
    for svc in services:
        clash = service_link_variables(svc) & settings
        assert not clash, f"Service {svc['metadata']['name']} would set {sorted(clash)}"
    assert service_link_variables({"metadata": {"name": "campaign-api"},
                                   "spec": {"ports": [{"port": 8000}]}}) & settings  # fmt: skip


def test_api_example_secret(api_env: dict[str, dict[str, Any]]) -> None:
    from app.settings import parse_api_tokens

    text = (K8S / API_EXAMPLE_SECRET).read_text()
    assert re.search(r"(?m)^#.*\bEXAMPLE\b", text), "mark the file as an example at the top"
    secret = the_one(API_EXAMPLE_SECRET, "Secret")
    ref = api_env["CAMPAIGN_API_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert secret["metadata"]["name"] == ref["name"]
    assert "data" not in secret, "stringData only"
    tokens = secret["stringData"][ref["key"]]
    assert "CHANGE-ME" in tokens
    parsed = parse_api_tokens(tokens)
    assert sorted(parsed.values()) == [False, True], "one read-write and one ro: token"
    assert "kubectl create secret generic campaign-api" in text


def test_readme_gives_the_api_steps(api_service: dict[str, Any]) -> None:
    text = K8S_README.read_text()
    name = api_service["metadata"]["name"]
    for step in (
        "kubectl create secret generic campaign-api",
        "kubectl rollout status deployment/campaign-api",
        f"kubectl port-forward service/{name} 8000:8000",
        "http://localhost:8000/ui/",
    ):
        assert step in text, f"deploy/kubernetes/README.md lacks {step!r}"


# --------------------------------------------------------------------------- helpers' tests


def test_helpers() -> None:
    assert parse_quantity("250m") == 0.25
    assert parse_quantity("1") == 1
    assert parse_quantity(2) == 2
    assert parse_quantity("512Mi") == 512 * 2**20
    assert parse_quantity("1G") == 1e9
    with pytest.raises(AssertionError):
        parse_quantity("1 GB")
    assert selects({"a": "1"}, {"a": "1", "b": "2"})
    assert not selects({"a": "1", "c": "3"}, {"a": "1", "b": "2"})
    assert not selects({}, {"a": "1"})
    assert dockerfile_user("FROM a AS b\nUSER 5\nFROM c\nUSER 10001:10002\n") == ("10001", "10002")
    assert dockerfile_user("FROM a\nUSER 7\n") == ("7", None)
    with pytest.raises(AssertionError):
        dockerfile_user("FROM a AS b\nUSER 5\nFROM c\n")
    assert promql_aggregation('max(x{s="d"})') == ("max", 'x{s="d"}')
    assert promql_aggregation("max without (pod) (x)")[0] == "max"
    assert promql_aggregation("sum(x) by (a)")[0] == "sum"
    with pytest.raises(AssertionError):
        promql_aggregation("max(x) + y")
    pod = {"securityContext": {"runAsUser": 1, "fsGroup": 2}}
    assert effective_security(pod, {"securityContext": {"runAsUser": 3}}) == {"runAsUser": 3}
    assert effective_security(pod, {}) == {"runAsUser": 1}
