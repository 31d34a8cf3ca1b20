"""Offline checks of the deployment files, no Docker and no cluster: the Compose stack (deploy/compose*.yaml) against
the Compose Specification schema vendored in check-jsonschema, the Kubernetes manifests (deploy/k8s/) against the
Kubernetes API schemas of kubernetes-validate (strict: unknown fields fail) and the RayCluster against KubeRay's CRD
schema vendored in deploy/k8s/schemas/ (made strict here); and the topology DESIGN.md describes: a shared volume at
/shared, health-gated start order, secrets only from deploy/.env or a Secret, Ray token authentication everywhere,
MLflow behind its basic-auth app, a PostgreSQL role per database (postgres-init.sql, also run on a real server), the
MLflow pod seeing only its artifact directory, and NetworkPolicies that let only what needs a pod reach it."""

import configparser
import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

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
POSTGRES_INIT = DEPLOY / "postgres-init.sql"

KUBERAY_VERSION = "v1.7.0"  # the release whose RayCluster CRD schema is vendored (deploy/k8s/schemas/README.md)
RAYCLUSTER_SCHEMA = K8S / "schemas" / "ray.io_rayclusters.v1.json"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest Kubernetes API the manifests are validated against
NOT_APPLIED = {"kustomization.yaml", "secrets.example.yaml"}  # in deploy/k8s but not kustomize resources
OUR_IMAGE = re.compile(r"(^|/)san:(cpu|cuda)$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
# A PostgreSQL URL as the stacks write it: its password, if any, a Compose ${VAR...} or a Kubernetes $(VAR).
DB_URL = re.compile(
    r"postgresql\+psycopg://(?P<user>\w+)(?::(?:\$\{(?P<var>\w+)[^}]*\}|\$\((?P<ref>\w+)\)))?"
    r"@(?P<host>[\w.-]+):(?P<port>\d+)/(?P<db>\w+)"
)
PASSWORD_HOLDERS = {  # each password of deploy/.env → the compose services that receive it, and no others
    "POSTGRES_PASSWORD": {"postgres"},
    "SAN_DB_PASSWORD": {"postgres", "api"},
    "MLFLOW_DB_PASSWORD": {"postgres", "mlflow"},
    "MLFLOW_ADMIN_PASSWORD": {"mlflow", "api", "ray-head", "ray-worker"},
    "MLFLOW_FLASK_SECRET_KEY": {"mlflow"},
}
API_POD, MLFLOW_POD, POSTGRES_POD = (
    "api.yaml:Deployment/api",
    "mlflow.yaml:Deployment/mlflow",
    "postgres.yaml:StatefulSet/postgres",
)
RAY_PODS = ("RayCluster/head", "RayCluster/gpu")
SECRET_HOLDERS = {  # each key of san-secrets → the pods (pod_specs labels) whose containers receive it, and no others
    "postgres-password": {POSTGRES_POD},
    "san-db-password": {POSTGRES_POD, API_POD},
    "mlflow-db-password": {POSTGRES_POD, MLFLOW_POD},
    "mlflow-admin-password": {MLFLOW_POD, API_POD, *RAY_PODS},
    "mlflow-flask-secret-key": {MLFLOW_POD},
}


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
    assert set(PASSWORD_HOLDERS) | {"RAY_AUTH_TOKEN", "SAN_TOKENS"} <= set(assigned)
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
        ["api"],
        ["ray-head"],
        ["ray-worker"],
        ["mlflow", "--app-name", "basic-auth"],
    ]

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
    assert init["/docker-entrypoint-initdb.d/10-roles.sql"] == "./postgres-init.sql"


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
            if label == MLFLOW_POD:
                continue  # its artifact directory alone: test_k8s_mlflow_mounts_only_its_artifact_directory
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


# --- Database roles ----------------------------------------------------------------------------------------------


def init_statements() -> list[str]:
    """postgres-init.sql's SQL statements, whitespace folded: not its comments, psql's backslash commands or the DO
    blocks that stop it when a password is missing."""
    skipped = ("--", "\\", "DO $$")
    lines = [line for line in POSTGRES_INIT.read_text().splitlines() if not line.lstrip().startswith(skipped)]
    return [" ".join(statement.split()) for statement in " ".join(lines).split(";") if statement.strip()]


def test_postgres_init_gives_each_role_its_own_databases_and_revokes_public_connect():
    text = POSTGRES_INIT.read_text()
    assert re.findall(r"^\\getenv (\w+) (\w+)$", text, re.MULTILINE) == [
        ("san_password", "SAN_DB_PASSWORD"),
        ("mlflow_password", "MLFLOW_DB_PASSWORD"),
    ]
    statements = init_statements()
    roles = dict(
        re.fullmatch(r"CREATE ROLE (\w+) LOGIN PASSWORD :'(\w+)'", s).groups()
        for s in statements
        if s.startswith("CREATE ROLE")
    )
    assert roles == {"san": "san_password", "mlflow": "mlflow_password"}  # no SUPERUSER, CREATEDB, CREATEROLE
    owners = dict(
        re.fullmatch(r"CREATE DATABASE (\w+) OWNER (\w+)", s).groups()
        for s in statements
        if s.startswith("CREATE DATABASE")
    )
    assert owners == {"san": "san", "mlflow": "mlflow", "mlflow_auth": "mlflow"}
    revoked = {
        re.fullmatch(r"REVOKE CONNECT, TEMPORARY ON DATABASE (\w+) FROM PUBLIC", s)[1]
        for s in statements
        if s.startswith("REVOKE")
    }
    assert revoked == set(owners)
    assert len(statements) == len(roles) + len(owners) + len(revoked), "no GRANT or other statement"


def test_compose_gives_the_api_and_mlflow_their_own_roles_and_each_password_only_where_needed():
    services = load_yaml(COMPOSE)["services"]
    api = DB_URL.fullmatch(environment(services["api"])["SAN_DATABASE_URL"])
    assert (api["user"], api["var"], api["host"], api["db"]) == ("san", "SAN_DB_PASSWORD", "postgres", "san")
    mlflow = DB_URL.fullmatch(environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    assert (mlflow["user"], mlflow["var"], mlflow["host"], mlflow["db"]) == (
        "mlflow",
        "MLFLOW_DB_PASSWORD",
        "postgres",
        "mlflow",
    )
    postgres = environment(services["postgres"])
    assert postgres["POSTGRES_USER"] == "postgres" and "POSTGRES_DB" not in postgres  # the init script makes them
    for name in ("POSTGRES_PASSWORD", "SAN_DB_PASSWORD", "MLFLOW_DB_PASSWORD"):  # the superuser's, the roles' (\getenv)
        assert postgres[name].startswith(f"${{{name}:?"), name
    holders = {
        variable: {
            name
            for name, service in services.items()
            if any(f"${{{variable}:" in value for value in environment(service).values())
        }
        for variable in PASSWORD_HOLDERS
    }
    assert holders == PASSWORD_HOLDERS


def test_compose_networks_keep_the_ray_nodes_away_from_postgres_and_minio():
    compose = load_yaml(COMPOSE)
    networks = {name: set(service.get("networks", ["default"])) for name, service in compose["services"].items()}
    members = {
        network: {name for name, joined in networks.items() if network in joined} for network in compose["networks"]
    }
    assert members["db"] == {"postgres", "api", "mlflow"} and networks["postgres"] == {"db"}
    assert members["objects"] == {"minio", "minio-init", "mlflow"} and networks["minio"] == {"objects"}
    assert networks["ray-head"] == networks["ray-worker"] == {"default"}  # the API, MLflow and each other
    assert {"api", "mlflow"} <= members["default"]
    assert compose["networks"]["db"]["internal"] is True and compose["networks"]["objects"]["internal"] is True
    assert "ports" not in compose["services"]["postgres"] and "ports" not in compose["services"]["minio"]


def test_k8s_gives_the_api_and_mlflow_their_own_roles_and_each_secret_only_where_needed():
    pods = pod_specs()
    api_env, mlflow_env = env_of(pods[API_POD]["containers"][0]), env_of(pods[MLFLOW_POD]["containers"][0])
    api = DB_URL.fullmatch(api_env["SAN_DATABASE_URL"]["value"])
    assert (api["user"], api["host"], api["db"]) == ("san", "postgres", "san")
    assert api_env[api["ref"]]["valueFrom"]["secretKeyRef"]["key"] == "san-db-password"
    mlflow = DB_URL.fullmatch(mlflow_env["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert (mlflow["user"], mlflow["host"], mlflow["db"]) == ("mlflow", "postgres", "mlflow")
    assert mlflow_env[mlflow["ref"]]["valueFrom"]["secretKeyRef"]["key"] == "mlflow-db-password"

    (postgres,) = pods[POSTGRES_POD]["containers"]
    env = env_of(postgres)
    assert env["POSTGRES_USER"]["value"] == "postgres" and "POSTGRES_DB" not in env
    for name, key in {
        "POSTGRES_PASSWORD": "postgres-password",
        "SAN_DB_PASSWORD": "san-db-password",
        "MLFLOW_DB_PASSWORD": "mlflow-db-password",
    }.items():
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == key, name
    init = manifest("ConfigMap", "postgres-init")
    assert init["data"] == {"10-roles.sql": POSTGRES_INIT.read_text()}, "deploy/postgres-init.sql, verbatim"
    (volume,) = [v for v in pods[POSTGRES_POD]["volumes"] if v.get("configMap", {}).get("name") == "postgres-init"]
    mounts = {mount["name"]: mount["mountPath"] for mount in postgres["volumeMounts"]}
    assert mounts[volume["name"]] == "/docker-entrypoint-initdb.d"

    holders: dict[str, set[str]] = {key: set() for key in SECRET_HOLDERS}
    for label, pod in pods.items():
        for node in walk([*pod.get("initContainers", []), *pod["containers"]]):
            if isinstance(node, dict) and node.get("secretKeyRef", {}).get("key") in holders:
                holders[node["secretKeyRef"]["key"]].add(label)
    assert holders == SECRET_HOLDERS


class ScratchPostgres:
    """A throwaway PostgreSQL cluster on a free port, TCP on 127.0.0.1 only, password (SCRAM) authentication for
    every user, superuser postgres: as the postgres image's entrypoint sets one up. As root, the server runs as the
    Debian package's postgres user (PostgreSQL refuses root)."""

    SUPERUSER_PASSWORD = "superuser-password-for-the-test"

    def __init__(self, bindir: Path) -> None:
        self.bin, self.port = bindir, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="san-pg-init-"))  # not pytest's tmp: private to root
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def server(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, timeout=120)

    def __enter__(self) -> "ScratchPostgres":
        password = self.dir / "superuser-password"
        password.write_text(self.SUPERUSER_PASSWORD)
        if self.as_user:
            for path in (self.dir, password):
                shutil.chown(path, "postgres", "postgres")
        self.server(
            str(self.bin / "initdb"),
            "-D",
            str(self.dir / "data"),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--auth=scram-sha-256",
            f"--pwfile={password}",
        )
        self.server(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k '' -h 127.0.0.1",
            "start",
        )
        return self

    def __exit__(self, *exc) -> None:
        self.server(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def run_init(self, env: dict[str, str]) -> subprocess.CompletedProcess:
        """postgres-init.sql as the image's docker-entrypoint.sh runs an init file: psql as the superuser."""
        command = [
            str(self.bin / "psql"),
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--username",
            "postgres",
            "--no-password",
            "--no-psqlrc",
            "--dbname",
            "postgres",
            "-f",
            str(POSTGRES_INIT),
        ]
        env = {**os.environ, "PGPASSWORD": self.SUPERUSER_PASSWORD, **env}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    def connect(self, user: str, password: str, database: str):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=password,
            dbname=database,
            connect_timeout=30,
            autocommit=True,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROLE_PASSWORDS = {"san": "san-role-password-0123456789", "mlflow": "mlflow-role-password-'quoted'"}


@pytest.fixture(scope="module")
def postgres_roles():
    """A real PostgreSQL server after postgres-init.sql ran on it with the roles' passwords."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not versions:
        pytest.skip("PostgreSQL is not installed (make setup installs the Debian package 'postgresql')")
    with ScratchPostgres(versions[-1].parent) as server:
        without = server.run_init({"SAN_DB_PASSWORD": ROLE_PASSWORDS["san"]})
        assert without.returncode != 0 and "set MLFLOW_DB_PASSWORD" in without.stderr, without.stderr
        with server.connect("postgres", server.SUPERUSER_PASSWORD, "postgres") as superuser:
            assert not superuser.execute("SELECT 1 FROM pg_roles WHERE rolname IN ('san', 'mlflow')").fetchall()
        done = server.run_init(
            {"SAN_DB_PASSWORD": ROLE_PASSWORDS["san"], "MLFLOW_DB_PASSWORD": ROLE_PASSWORDS["mlflow"]}
        )
        assert done.returncode == 0, done.stderr
        yield server


def test_postgres_init_on_a_real_server_keeps_each_role_out_of_the_others_databases(postgres_roles):
    import psycopg

    server = postgres_roles
    own = {"san": ["san"], "mlflow": ["mlflow", "mlflow_auth"]}
    for role, databases in own.items():
        for database in ("san", "mlflow", "mlflow_auth"):
            if database in databases:
                with server.connect(role, ROLE_PASSWORDS[role], database) as connection:
                    connection.execute("CREATE TABLE probe (id integer)")  # owns the database's public schema
                    assert connection.execute("SELECT current_user").fetchone() == (role,)
            else:
                with pytest.raises(psycopg.OperationalError, match=f'permission denied for database "{database}"'):
                    server.connect(role, ROLE_PASSWORDS[role], database)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        server.connect("mlflow", ROLE_PASSWORDS["san"], "mlflow")
    with server.connect("postgres", server.SUPERUSER_PASSWORD, "postgres") as superuser:
        flags = superuser.execute(
            "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
            "WHERE rolname IN ('san', 'mlflow') ORDER BY rolname"
        ).fetchall()
        assert flags == [("mlflow", False, False, False), ("san", False, False, False)]


# --- MLflow: basic auth, its artifact directory only ------------------------------------------------------------


def auth_settings(ini: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read_string(ini)
    assert parser.sections() == ["mlflow"]
    return dict(parser["mlflow"])


def compose_auth_ini() -> str:
    compose = load_yaml(COMPOSE)
    (config,) = [c for c in compose["services"]["mlflow"]["configs"] if c["source"] == "mlflow-auth"]
    assert environment(compose["services"]["mlflow"])["MLFLOW_AUTH_CONFIG_PATH"] == config["target"]
    return compose["configs"]["mlflow-auth"]["content"]


def k8s_auth_ini() -> str:
    (container,) = pod_specs()[MLFLOW_POD]["containers"]
    path = Path(env_of(container)["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    volumes = {volume["name"]: volume for volume in pod_specs()[MLFLOW_POD]["volumes"]}
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True
    config_map = manifest("ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    return config_map["data"][path.name]


def mlflow_auth_config_module():
    """The installed MLflow's basic-auth config reader, alone: importing it as mlflow.server.auth.config would run
    that package's __init__, which builds the auth app (and needs Flask-WTF, the mlflow[auth] extra)."""
    import importlib.util

    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config_alone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mlflow_auth_config_is_one_file_that_the_installed_mlflow_reads_as_meant(tmp_path, monkeypatch):
    from importlib.metadata import entry_points

    config = mlflow_auth_config_module()
    AuthConfig, read_auth_config = config.AuthConfig, config.read_auth_config
    ini = compose_auth_ini()
    assert k8s_auth_ini() == ini, "compose.yaml's config mlflow-auth and mlflow.yaml's ConfigMap differ"
    settings = auth_settings(ini)
    assert set(settings) <= set(AuthConfig._fields), "a key MLflow does not read is ignored silently"
    assert settings["default_permission"] == "READ"  # logged-in users read every experiment
    store = DB_URL.fullmatch(settings["database_uri"])  # no password in a file: libpq reads PGPASSWORD
    assert (store["user"], store["host"], store["db"]) == ("mlflow", "postgres", "mlflow_auth")
    assert store["var"] is None and store["ref"] is None
    path = tmp_path / "basic_auth.ini"
    path.write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret-0123")
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    read = read_auth_config()
    assert (read.default_permission, read.database_uri) == ("READ", settings["database_uri"])
    assert (read.admin_username, read.admin_password) == (settings["admin_username"], "from-the-secret-0123")
    assert "basic-auth" in {app.name for app in entry_points(group="mlflow.app")}  # --app-name basic-auth


def test_compose_mlflow_requires_a_login_and_the_api_and_ray_nodes_have_one():
    services = load_yaml(COMPOSE)["services"]
    env = environment(services["mlflow"])
    assert services["mlflow"]["command"] == ["mlflow", "--app-name", "basic-auth"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SECRET_KEY:?")
    assert env["PGPASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?")  # for the auth store's URI, which names none
    admin = auth_settings(compose_auth_ini())["admin_username"]
    for name in ("api", "ray-head", "ray-worker"):  # the API reads and writes runs, job drivers and rank 0 log them
        client = environment(services[name])
        assert client["SAN_MLFLOW_URI"] == "http://mlflow:5000"
        assert client["MLFLOW_TRACKING_USERNAME"] == admin, name
        assert client["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?"), name


def test_k8s_mlflow_requires_a_login_and_the_api_and_ray_nodes_have_one():
    pods = pod_specs()
    (container,) = pods[MLFLOW_POD]["containers"]
    assert container["args"] == ["mlflow", "--app-name", "basic-auth"]
    env = env_of(container)
    for name, key in {
        "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow-admin-password",
        "PGPASSWORD": "mlflow-db-password",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "mlflow-flask-secret-key",
    }.items():
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == key, name
    config = manifest("ConfigMap", "san-config")["data"]
    assert config["MLFLOW_TRACKING_USERNAME"] == auth_settings(k8s_auth_ini())["admin_username"]
    (port,) = manifest("Service", "mlflow")["spec"]["ports"]
    assert config["SAN_MLFLOW_URI"] == f"http://mlflow:{port['port']}"
    for label in (API_POD, *RAY_PODS):
        client = pods[label]["containers"][0]
        assert {"configMapRef": {"name": "san-config"}} in client["envFrom"], label  # SAN_MLFLOW_URI, the user
        ref = env_of(client)["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("san-secrets", "mlflow-admin-password"), label
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # the one path basic auth leaves open
        assert container[probe]["httpGet"]["path"] == "/health", probe


def test_k8s_mlflow_mounts_only_its_artifact_directory():
    pod = pod_specs()[MLFLOW_POD]
    claims = {
        volume["name"]: volume["persistentVolumeClaim"]["claimName"]
        for volume in pod["volumes"]
        if "persistentVolumeClaim" in volume
    }
    (container,) = pod["containers"]
    destination = env_of(container)["MLFLOW_ARTIFACTS_DESTINATION"]["value"]
    (mount,) = [mount for mount in container["volumeMounts"] if mount["name"] in claims]
    assert claims[mount["name"]] == "san-shared"
    assert mount == {"name": mount["name"], "mountPath": destination, "subPath": "mlflow-artifacts"}
    assert destination == "/shared/mlflow-artifacts"  # where pvc.yaml lays MLflow's artifacts out on the claim
    assert "/shared/mlflow-artifacts" in (K8S / "pvc.yaml").read_text()
    # The subPath is made by the pod's user first: the kubelet would create a missing one owned by root.
    (init,) = pod["initContainers"]
    assert init["command"][-1] == f"mkdir -p {destination}"
    assert [m["mountPath"] for m in init["volumeMounts"] if m["name"] == mount["name"]] == ["/shared"]
    assert pod["securityContext"]["runAsUser"] == 10001 and "runAsUser" not in init.get("securityContext", {})


def test_compose_mlflow_mounts_no_shared_volume():
    mlflow = load_yaml(COMPOSE)["services"]["mlflow"]
    assert "volumes" not in mlflow  # its artifacts are in MinIO, its databases in postgres
    assert environment(mlflow)["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def wait_for(probe, timeout_s: float, what: str):
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := probe():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_mlflow_with_the_stacks_auth_config_on_their_postgres_roles(postgres_roles, tmp_path, monkeypatch):
    """The MLflow server as the compose mlflow service runs it (the image's mlflow role, --app-name basic-auth, the
    same basic_auth.ini and variables), on the databases postgres-init.sql made: no login, no access; the admin
    account (the API's and Ray's) logs runs and artifacts; a user the admin makes reads them and writes nothing."""
    from importlib.util import find_spec

    import httpx

    if find_spec("flask_wtf") is None:
        pytest.skip("Flask-WTF is not installed: MLflow's basic-auth app needs it (the mlflow[auth] extra)")
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    server, admin_password = postgres_roles, "mlflow-admin-password-0123"
    address = f"127.0.0.1:{server.port}"
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(compose_auth_ini().replace("@postgres:5432/", f"@{address}/"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PG"))}
    env |= {
        "PGPASSWORD": ROLE_PASSWORDS["mlflow"],
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-the-test",
        # as compose runs it (the GenAI job runner off)
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": load_yaml(COMPOSE)["services"]["mlflow"]["environment"][
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
        ],
    }
    port, backend = free_port(), f"postgresql+psycopg://mlflow:{ROLE_PASSWORDS['mlflow']}@{address}/mlflow"
    role_args = load_yaml(COMPOSE)["services"]["mlflow"]["command"][1:]  # after the role: --app-name basic-auth
    # docker/entrypoint.sh's mlflow role, on this machine's ports and paths
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        "--serve-artifacts",
        "--workers",
        "1",
        *role_args,
    ]
    with open(tmp_path / "mlflow.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: process.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200,
            300,
            f"mlflow server (log: {tmp_path / 'mlflow.log'})",
        )
        search = f"{url}/api/2.0/mlflow/experiments/search"
        assert httpx.get(search, params={"max_results": 1}, timeout=60).status_code == 401
        assert (
            httpx.get(search, params={"max_results": 1}, auth=("admin", "wrong-password-0123"), timeout=60).status_code
            == 401
        )

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_settings(ini.read_text())["admin_username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        admin = MlflowClient(url)
        run = admin.create_run(admin.create_experiment("san/fashion-mnist"))
        admin.log_metric(run.info.run_id, "val/top1", 0.5)
        (tmp_path / "spec.json").write_text("{}")
        admin.log_artifact(run.info.run_id, str(tmp_path / "spec.json"))
        assert [artifact.path for artifact in admin.list_artifacts(run.info.run_id)] == ["spec.json"]
        get_app_client("basic-auth", tracking_uri=url).create_user("reader", "reader-password-0123")

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-0123")
        reader = MlflowClient(url)
        assert reader.get_run(run.info.run_id).data.metrics == {"val/top1": 0.5}
        with pytest.raises(MlflowException, match=r"PERMISSION_DENIED|Permission denied"):
            reader.log_metric(run.info.run_id, "val/top1", 1.0)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            process.wait(60)


# --- NetworkPolicies ---------------------------------------------------------------------------------------------


def kuberay_pod_labels(cluster: dict, group: str, template: dict) -> dict[str, str]:
    """The labels KubeRay gives a pod of ``group`` ("head" or a worker group's name): its defaults, the template's
    over them, then ray.io/cluster, ray.io/node-type and ray.io/group, which no template overrides (KubeRay's
    labelPod, ray-operator/controllers/ray/common/pod.go)."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels |= template["metadata"].get("labels", {})
    head = group == "head"
    return labels | {
        "ray.io/cluster": cluster["metadata"]["name"],
        "ray.io/node-type": "head" if head else "worker",
        "ray.io/group": "headgroup" if head else group,
    }


@functools.cache
def stack_pods() -> dict[str, tuple[dict[str, str], dict[str, int]]]:
    """Each kind of pod the stack runs → (its labels, its containers' named ports). Cached: read it, never change it."""
    templates = {
        "api": manifest("Deployment", "api")["spec"]["template"],
        "mlflow": manifest("Deployment", "mlflow")["spec"]["template"],
        "postgres": manifest("StatefulSet", "postgres")["spec"]["template"],
    }
    labels = {name: template["metadata"]["labels"] for name, template in templates.items()}
    cluster = raycluster()
    for group, template in ray_pod_templates(cluster).items():
        name = "ray-head" if group == "head" else f"ray-worker-{group}"
        templates[name], labels[name] = template, kuberay_pod_labels(cluster, group, template)
    ports = {
        name: {
            port["name"]: port["containerPort"]
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
        }
        for name, template in templates.items()
    }
    return {name: (labels[name], ports[name]) for name in templates}


@functools.cache
def network_policies() -> list[dict]:
    """Cached: read them, or change a deep copy."""
    return [doc for _, doc in k8s_documents() if doc["kind"] == "NetworkPolicy"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchLabels only, so that this test can evaluate every selector"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def unmatched_selectors(policies: list[dict]) -> list[str]:
    """Every podSelector of ``policies`` (the selected pods, and each rule's sources) that selects no pod of the stack:
    a label the manifests do not set, so the policy does not do what it says."""
    labels = [pod_labels for pod_labels, _ in stack_pods().values()]
    selectors = [(policy["metadata"]["name"], policy["spec"]["podSelector"]) for policy in policies]
    selectors += [
        (policy["metadata"]["name"], peer["podSelector"])
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
        for peer in rule.get("from", [])
    ]
    return [f"{name}: {selector}" for name, selector in selectors if not any(selects(selector, pod) for pod in labels)]


def allowed_sources(target: str, port: int, policies: list[dict] | None = None) -> set[str | None]:
    """The pods of the stack (None: anything else, e.g. outside the namespace) that may open ``port`` of ``target``."""
    pods = stack_pods()
    target_labels, target_ports = pods[target]
    applied = [
        policy["spec"]
        for policy in policies or network_policies()
        if selects(policy["spec"]["podSelector"], target_labels)
    ]
    assert applied and all("Ingress" in spec["policyTypes"] for spec in applied), f"{target} is not isolated"
    allowed: set[str | None] = set()
    for rule in (rule for spec in applied for rule in spec.get("ingress", [])):
        ports = {
            target_ports[p["port"]] if isinstance(p["port"], str) else p["port"]
            for p in rule.get("ports", [])
            if p.get("protocol", "TCP") == "TCP"
        }
        if "ports" in rule and port not in ports:
            continue
        if "from" not in rule:
            return {None, *pods}
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "peers in this namespace only"
            allowed |= {name for name, (labels, _) in pods.items() if selects(peer["podSelector"], labels)}
    return allowed


def service_target(name: str) -> tuple[str, list[int]]:
    """The kind of pod a Service selects (exactly one) and its ports as that pod declares them (targetPort resolved)."""
    service = manifest("Service", name)
    selector = {"matchLabels": service["spec"]["selector"]}
    (pod,) = [pod for pod, (labels, _) in stack_pods().items() if selects(selector, labels)]
    named = stack_pods()[pod][1]
    return pod, [
        named[p["targetPort"]] if isinstance(p["targetPort"], str) else p["targetPort"]
        for p in service["spec"]["ports"]
    ]


def policy_ports(target: str) -> set[int]:
    """The ports the NetworkPolicies that select ``target`` open on it."""
    labels, named = stack_pods()[target]
    return {
        named[port["port"]] if isinstance(port["port"], str) else port["port"]
        for policy in network_policies()
        if selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    }


def test_network_policies_deny_ingress_by_default_and_select_pods_by_the_labels_the_manifests_set():
    policies = network_policies()
    assert [p["metadata"]["name"] for p in policies if p["spec"]["podSelector"] == {}] == ["default-deny-ingress"]
    (deny,) = [p["spec"] for p in policies if p["metadata"]["name"] == "default-deny-ingress"]
    assert deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies), "egress stays open (DNS, images)"
    assert unmatched_selectors(policies) == []
    labels = {name: pod_labels for name, (pod_labels, _) in stack_pods().items()}
    assert labels["ray-head"]["ray.io/node-type"] == "head" and labels["ray-worker-gpu"]["ray.io/node-type"] == "worker"


def test_a_selector_on_a_label_no_pod_carries_is_caught():
    policies = copy.deepcopy(network_policies())
    (mlflow,) = [p for p in policies if p["metadata"]["name"] == "mlflow-ingress"]
    mlflow["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"] = {"app.kubernetes.io/name": "ray"}
    assert unmatched_selectors(policies) == []  # our templates do set it: KubeRay keeps template labels
    mlflow["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"] = {"ray.io/cluster": "raycluster"}
    assert unmatched_selectors(policies) == ["mlflow-ingress: {'matchLabels': {'ray.io/cluster': 'raycluster'}}"]


def ray_pods() -> set[str]:
    return {name for name in stack_pods() if name.startswith("ray-")}


def test_each_service_port_is_open_to_exactly_the_pods_that_use_it():
    clients = {"api": {None, *stack_pods()}, "mlflow": {"api", *ray_pods()}, "postgres": {"api", "mlflow"}}
    for name, expected in clients.items():  # the Service of that name, and the pods it selects
        pod, ports = service_target(name)
        assert pod == name and policy_ports(pod) == set(ports), name  # the policy opens the Service's port, no other
        for port in ports:
            assert allowed_sources(pod, port) == expected, (name, port)
        assert allowed_sources(pod, 22) == set(), name
    # and the clients connect to those ports
    config = manifest("ConfigMap", "san-config")["data"]
    assert [urlsplit(config["SAN_MLFLOW_URI"]).port] == service_target("mlflow")[1]
    for url in (
        env_of(pod_specs()[API_POD]["containers"][0])["SAN_DATABASE_URL"]["value"],
        env_of(pod_specs()[MLFLOW_POD]["containers"][0])["MLFLOW_BACKEND_STORE_URI"]["value"],
    ):
        assert [int(DB_URL.fullmatch(url)["port"])] == service_target("postgres")[1]


def test_the_ray_head_is_reached_by_the_ray_pods_and_by_the_api_only_on_the_jobs_api():
    cluster = raycluster()
    head_ports = stack_pods()["ray-head"][1]
    params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head_ports == {
        "gcs-server": int(params["port"]),
        "dashboard": int(params["dashboard-port"]),
        "client": 10001,
    }
    jobs_api = urlsplit(manifest("ConfigMap", "san-config")["data"]["SAN_RAY_ADDRESS"])
    assert jobs_api.hostname == f"{cluster['metadata']['name']}-head-svc" and jobs_api.port == head_ports["dashboard"]
    for name, port in head_ports.items():
        expected = ray_pods() | ({"api"} if port == jobs_api.port else set())
        assert allowed_sources("ray-head", port) == expected, name
    for port in (8080, 52365, 40000):  # metrics, a dashboard agent, a worker or gloo port: Ray's own traffic only
        assert allowed_sources("ray-head", port) == ray_pods(), port
        for worker in ray_pods() - {"ray-head"}:
            assert allowed_sources(worker, port) == ray_pods(), (worker, port)
