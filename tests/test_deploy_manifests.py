"""Offline checks of the deployment files, no Docker and no cluster: the Compose stack (deploy/compose*.yaml) against
the Compose Specification schema vendored in check-jsonschema, the Kubernetes manifests (deploy/k8s/) against the
Kubernetes API schemas of kubernetes-validate (strict: unknown fields fail) and the RayCluster against KubeRay's CRD
schema vendored in deploy/k8s/schemas/ (made strict here); and the topology DESIGN.md describes: a shared volume at
/shared, health-gated start order, secrets only from deploy/.env or a Secret, Ray token authentication everywhere."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"

KUBERAY_VERSION = "v1.7.0"  # the release whose RayCluster CRD schema is vendored (deploy/k8s/schemas/README.md)
RAYCLUSTER_SCHEMA = K8S / "schemas" / "ray.io_rayclusters.v1.json"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest Kubernetes API the manifests are validated against
NOT_APPLIED = {"kustomization.yaml", "secrets.example.yaml"}  # in deploy/k8s but not kustomize resources
OUR_IMAGE = re.compile(r"(^|/)san:(cpu|cuda)$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose_validate(*paths: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with its vendored Compose Specification schema."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a mapping (Compose allows a list of KEY=VALUE too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def volume_targets(service: dict) -> dict[str, str]:
    """target path → source, from short (``src:dst[:mode]``) or long volume syntax."""
    targets = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        targets[target] = source
    return targets


def strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


BRACED = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?")


def compose_variables(path: Path) -> dict[str, bool]:
    """Every variable a Compose file interpolates → whether it is required (no default)."""
    found: dict[str, bool] = {}
    for text in strings(load_yaml(path)):
        text = text.replace("$$", "")  # an escaped dollar reaches the container's shell, not Compose
        for match in BRACED.finditer(text):
            required = match["op"] in (None, "?", ":?")
            found[match["name"]] = found.get(match["name"], False) or required
        assert not re.search(r"\$[A-Za-z_]", BRACED.sub("", text)), f"{path.name}: use ${{VAR}} forms only: {text!r}"
    return found


def env_example() -> tuple[dict[str, str], set[str]]:
    """(variables set in env.example → value, variables only documented there as ``# NAME=default``)."""
    assigned, documented = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line):
            assigned[match[1]] = match[2]
        elif match := re.fullmatch(r"# ([A-Z_][A-Z0-9_]*)=.*", line):
            documented.add(match[1])
    return assigned, documented


# --- Compose ---------------------------------------------------------------------------------------------------


def test_compose_files_validate_against_the_compose_specification():
    result = compose_validate(COMPOSE, COMPOSE_GPU)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (COMPOSE, COMPOSE_GPU):
        assert "version" not in load_yaml(path), f"{path.name}: the obsolete top-level version: key"


def test_an_invalid_compose_document_fails_validation(tmp_path):
    bad = copy.deepcopy(load_yaml(COMPOSE))
    bad["services"]["api"]["helthcheck"] = bad["services"]["api"].pop("healthcheck")  # a misspelt key
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = compose_validate(path)
    assert result.returncode != 0
    assert "helthcheck" in result.stdout + result.stderr


def test_every_required_compose_variable_is_in_env_example_and_deploy_env_is_ignored():
    assigned, documented = env_example()
    for path in (COMPOSE, COMPOSE_GPU):
        for name, required in compose_variables(path).items():
            if required:
                assert name in assigned, f"{path.name} needs ${{{name}}}: add {name}= to env.example"
            else:
                assert name in assigned or name in documented, f"{path.name}: document # {name}=default in env.example"
    used = set(compose_variables(COMPOSE)) | set(compose_variables(COMPOSE_GPU))
    assert set(assigned) | documented <= used, "env.example names a variable no compose file uses"
    assert {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "SAN_TOKENS"} <= set(assigned)
    assert all(value == "" for value in assigned.values()), "env.example holds empty placeholders, never a secret"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git whether deploy/.env is ignored")
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "deploy/.env"], timeout=30)
    assert ignored.returncode == 0, "deploy/.env (the stack's secrets) must be git-ignored"


def test_compose_topology():
    services = load_yaml(COMPOSE)["services"]
    assert {"api", "ray-head", "ray-worker", "mlflow", "postgres", "minio", "minio-init"} <= set(services)
    for name in ("api", "ray-head", "ray-worker"):
        assert volume_targets(services[name]).get("/shared") == "shared", f"{name} mounts the shared volume"
        env = environment(services[name])
        assert env["SAN_DATA_ROOT"] == "/shared/data" and env["SAN_STORAGE_ROOT"] == "/shared/storage"
    assert "shared" in load_yaml(COMPOSE)["volumes"]
    assert [services[name]["command"] for name in ("api", "ray-head", "ray-worker", "mlflow")] == [
        ["api"], ["ray-head"], ["ray-worker"], ["mlflow"]]  # fmt: skip

    expected = {
        "api": {"postgres": "service_healthy", "ray-head": "service_healthy", "mlflow": "service_healthy"},
        "ray-worker": {"ray-head": "service_healthy"},
        "mlflow": {"postgres": "service_healthy", "minio-init": "service_completed_successfully"},
        "minio-init": {"minio": "service_healthy"},
    }
    for name, wanted in expected.items():
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert wanted.items() <= conditions.items(), f"{name} depends_on {conditions}"
    for name in ("api", "ray-head", "ray-worker", "mlflow", "postgres", "minio"):
        assert services[name]["healthcheck"]["test"], f"{name} declares a health check"

    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker, "ray-worker must scale (--scale ray-worker=N)"
    assert environment(worker)["RAY_HEAD_ADDRESS"] == "ray-head:6379"
    assert environment(services["api"])["SAN_RAY_ADDRESS"] == "http://ray-head:8265"
    assert environment(services["api"])["SAN_DATABASE_URL"].startswith("postgresql+psycopg://")

    mlflow = environment(services["mlflow"])
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in mlflow["MLFLOW_SERVER_ALLOWED_HOSTS"]  # the Host header the API and the jobs send

    init = volume_targets(services["postgres"])
    assert init["/docker-entrypoint-initdb.d/10-mlflow.sql"] == "./postgres-init.sql"
    assert "CREATE DATABASE mlflow" in (DEPLOY / "postgres-init.sql").read_text()


def test_compose_ray_token_auth_is_on_and_secrets_are_never_inline():
    base, gpu = load_yaml(COMPOSE)["services"], load_yaml(COMPOSE_GPU)["services"]
    for name in ("api", "ray-head", "ray-worker"):
        env = environment(base[name]) | environment(gpu.get(name, {}))  # as `-f compose.yaml -f compose.gpu.yaml`
        assert env.get("RAY_AUTH_MODE") == "token", name
        assert env.get("RAY_AUTH_TOKEN", "").startswith("${RAY_AUTH_TOKEN"), name
    for services in (base, gpu):
        for name, service in services.items():
            env = environment(service)
            assert env.get("RAY_AUTH_MODE", "token").lower() == "token", f"{name} must not disable Ray auth"
            for key, value in env.items():
                if SECRET_NAME.search(key) or ("://" in value and "@" in value):  # a secret or a URL with credentials
                    assert "${" in value, f"{name}: {key} must come from deploy/.env, not the compose file"


def test_compose_gpu_override():
    worker = load_yaml(COMPOSE_GPU)["services"]["ray-worker"]
    assert worker["image"] == "${SAN_CUDA_IMAGE:-san:cuda}"
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert environment(worker)["RAY_NUM_GPUS"] == str(device["count"])
    assert "container_name" not in worker and "ports" not in worker


# --- Kubernetes --------------------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def k8s_documents() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc]  # fmt: skip


def builtin_documents() -> list[tuple[str, dict]]:
    return [(label, doc) for label, doc in k8s_documents() if doc["kind"] != "RayCluster"]


def manifest(kind: str, name: str) -> dict:
    (doc,) = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def raycluster() -> dict:
    (doc,) = [doc for _, doc in k8s_documents() if doc["kind"] == "RayCluster"]
    return doc


def ray_pod_templates(cluster: dict) -> dict[str, dict]:
    groups = {"head": cluster["spec"]["headGroupSpec"]}
    groups |= {group["groupName"]: group for group in cluster["spec"]["workerGroupSpecs"]}
    return {name: group["template"] for name, group in groups.items()}


def pod_specs() -> dict[str, dict]:
    """Every pod spec of the stack: Deployments, StatefulSets and the RayCluster's groups."""
    specs = {label: doc["spec"]["template"]["spec"] for label, doc in builtin_documents()
             if doc["kind"] in ("Deployment", "StatefulSet")}  # fmt: skip
    specs |= {f"RayCluster/{name}": template["spec"] for name, template in ray_pod_templates(raycluster()).items()}
    return specs


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("label", "doc"), builtin_documents(), ids=[label for label, _ in builtin_documents()])
def test_kubernetes_manifests_validate_strictly(label, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_raycluster_pod_templates_validate_as_kubernetes_pod_templates(version):
    for name, template in ray_pod_templates(raycluster()).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(wrapped, version, strict=True)


def test_strict_kubernetes_validation_rejects_a_misspelt_field():
    bad = copy.deepcopy(manifest("Deployment", "api"))
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def strict(schema):
    """A CRD schema that rejects unknown fields: API servers prune them silently, so a typo would just vanish."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        unknown_kept = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in schema and not unknown_kept:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def raycluster_schema() -> dict:
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    assert KUBERAY_VERSION in schema["$comment"], "the vendored CRD names its KubeRay release"
    assert KUBERAY_VERSION in (K8S / "raycluster.yaml").read_text()
    return schema


def test_raycluster_validates_against_the_kuberay_crd_schema(raycluster_schema):
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(strict(raycluster_schema)).validate(cluster)


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MISSPELLINGS = {  # a typo each, in fields the CRD does not require (a missing required one fails anyway)
    "rayStartParam": lambda spec: rename(spec["headGroupSpec"], "rayStartParams", "rayStartParam"),
    "replica": lambda spec: rename(spec["workerGroupSpecs"][0], "replicas", "replica"),
    "volumeMount": lambda spec: rename(
        spec["headGroupSpec"]["template"]["spec"]["containers"][0], "volumeMounts", "volumeMount"
    ),
}


@pytest.mark.parametrize("typo", MISSPELLINGS)
def test_raycluster_schema_rejects_a_misspelt_field(raycluster_schema, typo):
    bad = copy.deepcopy(raycluster())
    MISSPELLINGS[typo](bad["spec"])
    jsonschema.Draft7Validator(raycluster_schema).validate(bad)  # the CRD as published lets it through...
    errors = list(jsonschema.Draft7Validator(strict(raycluster_schema)).iter_errors(bad))  # ...the strict one does not
    assert [error.message for error in errors] == [f"Additional properties are not allowed ('{typo}' was unexpected)"]


def test_raycluster_topology_and_ray_token_auth():
    cluster = raycluster()
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["include-dashboard"] == "true" and params["dashboard-port"] == "8265"
    assert params["dashboard-host"] == "0.0.0.0" and params["port"] == "6379"
    assert params["disable-usage-stats"] == "true"
    assert spec["authOptions"] == {"mode": "token", "secretName": "san-secrets"}

    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert OUR_IMAGE.search(worker["image"]) and worker["image"].endswith(":cuda")

    api, config = manifest("Deployment", "api"), manifest("ConfigMap", "san-config")
    assert config["data"]["SAN_RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert config["data"]["SAN_DATA_ROOT"] == "/shared/data" and config["data"]["SAN_STORAGE_ROOT"] == "/shared/storage"

    ray_containers = [template["spec"]["containers"][0] for template in ray_pod_templates(cluster).values()]
    for container in [*ray_containers, api["spec"]["template"]["spec"]["containers"][0]]:
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("san-secrets", "auth_token"), container["name"]
    for label, doc in k8s_documents():  # nothing turns Ray authentication off
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") == "RAY_AUTH_MODE":
                assert node.get("value") == "token", label
        assert doc.get("spec", {}).get("authOptions", {}).get("mode", "token") == "token", label


def test_pods_run_as_our_user_with_probes_resources_and_the_shared_volume():
    for label, pod in pod_specs().items():
        containers = [*pod.get("initContainers", []), *pod["containers"]]
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        for container in containers:
            assert container["resources"]["requests"] and container["resources"]["limits"], label
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, label
        if any(OUR_IMAGE.search(container["image"]) for container in containers):
            assert pod["securityContext"]["runAsUser"] == 10001, label
            claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"]
                      for volume in pod["volumes"] if "persistentVolumeClaim" in volume}  # fmt: skip
            mounts = {mount["mountPath"]: mount["name"] for mount in pod["containers"][0]["volumeMounts"]}
            assert claims[mounts["/shared"]] == "san-shared", f"{label} mounts the shared PVC at /shared"
    for label in ("api.yaml:Deployment/api", "mlflow.yaml:Deployment/mlflow"):
        container = pod_specs()[label]["containers"][0]
        assert container["readinessProbe"] and container["livenessProbe"], label
    (pvc,) = [doc for _, doc in builtin_documents() if doc["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "san-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_secret_references_exist_in_the_example_and_hold_placeholders():
    (example,) = [doc for label, doc in k8s_documents() if label.startswith("secrets.example.yaml:")]
    keys = set(example["stringData"])
    referenced = set()
    for _, doc in k8s_documents():
        for node in walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node:
                assert node["secretKeyRef"]["name"] == example["metadata"]["name"]
                referenced.add(node["secretKeyRef"]["key"])
    assert referenced == keys
    assert all("REPLACE" in value for value in example["stringData"].values()), "placeholders only"


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def test_kustomization_lists_every_manifest_once_in_apply_order():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a manifest listed twice"
    assert set(resources) == {path.name for path in K8S.glob("*.yaml")} - NOT_APPLIED
    assert resources[0] == "namespace.yaml"
    namespace = kustomization["namespace"]
    for label, doc in k8s_documents():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == namespace
        else:
            assert doc["metadata"]["namespace"] == namespace, f"{label} (so that kubectl apply -f works too)"
