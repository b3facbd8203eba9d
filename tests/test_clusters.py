"""The cluster files in clusters/: the launcher configs against Ray's own JSON schema, the image every node
runs, the KubeRay RayCluster / RayJob and the MLflow manifests with the fields raymia relies on. Offline:
YAML files, the schema shipped in the installed ray package, and pyproject.toml."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = ray.__version__


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _launcher_files() -> list[Path]:
    """Every single-document YAML in clusters/ with a `provider`: a Ray cluster launcher config."""
    out = []
    for p in sorted(CLUSTERS.glob("*.yaml")):
        docs = _docs(p)
        if len(docs) == 1 and "provider" in docs[0]:
            out.append(p)
    return out


LAUNCHERS = _launcher_files()
RAYCLUSTER = CLUSTERS / "kuberay-raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
MLFLOW_K8S = CLUSTERS / "mlflow-k8s.yaml"
README = CLUSTERS / "README.md"
DOCKERFILE = CLUSTERS / "Dockerfile"


def _built_image(text: str) -> str:
    """The tag of `docker build -f clusters/Dockerfile -t TAG .` in a file; exactly one distinct tag."""
    tags = set(re.findall(r"docker build -f clusters/Dockerfile -t (\S+) \.", text))
    assert len(tags) == 1, f"expected one image tag in the docker build commands, found {tags}"
    return tags.pop()


IMAGE = _built_image(DOCKERFILE.read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in the manifest, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher configs


def test_launcher_configs_found():
    names = {p.name for p in LAUNCHERS}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml"} <= names, names


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path):
    """The schema `ray up` validates against (ray/autoscaler/ray-schema.json of the installed Ray)."""
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert schema_path.is_file(), schema_path
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    config = _docs(path)[0]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]
    assert errors == []
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for k, t in types.items() if k != config["head_node_type"]) <= config[
        "max_workers"]


def _aws_default_amis() -> set[str]:
    try:
        from ray.autoscaler._private.aws.config import DEFAULT_AMI
    except ImportError:
        return set()
    return {a.lower() for a in DEFAULT_AMI.values()}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_every_node_type_names_a_current_gpu_image(path):
    """No node type falls back to Ray's default AMI / image (an EOL Ubuntu 18.04 DLAMI whose driver cannot
    run CUDA 13); the image named has NVIDIA driver >= 580."""
    config = _docs(path)[0]
    text = path.read_text()
    provider = config["provider"]["type"]
    for name, node_type in config["available_node_types"].items():
        nc = node_type["node_config"]
        if provider == "aws":
            ami = nc.get("ImageId", "")
            assert re.fullmatch(r"ami-[0-9a-zA-Z]{8,17}", ami), f"{name}: ImageId {ami!r}"
            assert ami.lower() not in _aws_default_amis() | {"", "latest_dlami"}, name
        elif provider == "gcp":
            boot = [d for d in nc["disks"] if d.get("boot")]
            assert len(boot) == 1, name
            image = boot[0]["initializeParams"]["sourceImage"]
            assert image.startswith("projects/deeplearning-platform-release/global/images/family/"), image
            driver = re.search(r"-nvidia-(\d+)$", image)
            assert driver and int(driver.group(1)) >= 580, f"{name}: {image} (driver >= 580 for CUDA 13)"
        else:
            pytest.fail(f"no image check for provider {provider}")
    if provider == "aws":
        assert len({t["node_config"]["ImageId"] for t in config["available_node_types"].values()}) == 1
        # the EDIT comment says how to look up the region's id
        assert "aws ssm get-parameter" in text
        assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-" in text


def test_gcp_gpu_nodes_schedule_terminate_on_host_maintenance():
    config = _docs(CLUSTERS / "gcp-gpu.yaml")[0]
    gpu_types = {k: t for k, t in config["available_node_types"].items() if t["node_config"].get("guestAccelerators")}
    assert gpu_types
    for name, node_type in gpu_types.items():
        scheduling = node_type["node_config"].get("scheduling")
        assert isinstance(scheduling, dict), f"{name}: scheduling must be a Compute API object, got {scheduling!r}"
        assert scheduling["onHostMaintenance"] == "TERMINATE", name


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_nodes_run_the_built_image(path):
    docker = _docs(path)[0]["docker"]
    assert docker["image"] == IMAGE
    assert "head_image" not in docker and "worker_image" not in docker
    assert docker["container_name"]
    shared, head, worker = (docker.get(k, []) for k in ("run_options", "head_run_options", "worker_run_options"))
    assert "--gpus all" in worker, worker
    assert "--gpus all" not in shared + head, "the CPU head has no GPU for --gpus all"
    for opts in (shared + head, shared + worker):
        assert any(o.startswith("--shm-size=") for o in opts), opts
    assert any("RAY_AUTH_MODE=token" in o for o in shared)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_nothing_heavy_at_start_up(path):
    """torch and raymia come with the image: no command pip-installs them when a node starts."""
    config = _docs(path)[0]
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    commands = [c for k in keys for c in config.get(k, [])]
    assert commands
    for c in commands:
        if re.search(r"\bpip3?\s+install\b", c):
            assert not re.search(r"torch|raymia|RAYMIA_SOURCE", c), c


def test_ray_version_pins_equal_the_installed_ray():
    patterns = [
        r"rayproject/ray:(\d+\.\d+\.\d+)",
        r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)",
        r"\bRAY_VERSION=(\d+\.\d+\.\d+)",
        r"rayVersion:\s*\"?(\d+\.\d+\.\d+)",
        r"ray\.__version__ == '(\d+\.\d+\.\d+)'",
        r"\bRay (\d+\.\d+\.\d+)",
    ]
    found: dict[str, set[str]] = {}
    for p in sorted(CLUSTERS.iterdir()):
        if p.is_file():
            text = p.read_text()
            for pat in patterns:
                for v in re.findall(pat, text):
                    found.setdefault(v, set()).add(p.name)
    assert found, "no Ray version pin found in clusters/"
    assert set(found) == {RAY_VERSION}, found
    assert {"Dockerfile", RAYCLUSTER.name, RAYJOB.name} <= found[RAY_VERSION]
    assert {p.name for p in LAUNCHERS} <= found[RAY_VERSION]


# ---------------------------------------------------------------------------------------------------------
# The image


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _requirement(name: str):
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def test_dockerfile_builds_ray_python311_cuda13_torch_and_raymia():
    text = DOCKERFILE.read_text()
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == RAY_VERSION
    assert _requirement("ray").specifier.contains(RAY_VERSION), "the image's Ray outside pyproject's bounds"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311\b", text, flags=re.M)
    assert re.fullmatch(r"cu13\d", args["TORCH_CUDA"]), args["TORCH_CUDA"]
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"), ("mlflow", "MLFLOW_VERSION"),
                     ("optuna", "OPTUNA_VERSION")):
        assert _requirement(pkg).specifier.contains(args[arg]), f"{arg}={args[arg]} outside pyproject's {pkg} bounds"
    assert '"psycopg2-binary==${PSYCOPG2_VERSION}"' in text  # postgresql:// for sweep.storage and MLflow
    assert re.search(r"pip install [^\n]*-c /tmp/constraints\.txt\s*\\\n\s*\. ", text), "raymia: pip install . "
    for copied in ("pyproject.toml", "raymia", "sweeps"):
        assert re.search(rf"^COPY [^\n]*\b{copied}\b", text, flags=re.M), copied
    assert IMAGE.rsplit(":", 1)[1] == PYPROJECT["project"]["version"], IMAGE


def test_one_image_name_everywhere():
    assert _built_image(README.read_text()) == IMAGE
    for path in sorted(CLUSTERS.iterdir()):
        if path.is_file() and "docker build -f clusters/Dockerfile" in path.read_text():
            assert _built_image(path.read_text()) == IMAGE, path.name
    for path in (RAYCLUSTER, RAYJOB):
        assert {c["image"] for c in _ray_containers(path)} == {IMAGE}, path.name
    mlflow = _kind(_docs(MLFLOW_K8S), "Deployment", "mlflow")
    assert mlflow["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


# ---------------------------------------------------------------------------------------------------------
# KubeRay
#
# The KubeRay CRD fields raymia's manifests use, as a subset JSON Schema. Field names, nesting and enums are
# those of ray-project/kuberay's Go API types, ray-operator/apis/ray/v1/raycluster_types.go (RayClusterSpec,
# AuthOptions, HeadGroupSpec, WorkerGroupSpec) and rayjob_types.go (RayJobSpec), from which
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml are generated; authOptions
# (mode: disabled | token) exists since KubeRay v1.5.1, the oldest version these manifests support.
# additionalProperties: false lists the fields a level may hold, so a misspelt field (which the API server
# would prune) fails here.

_STR, _INT, _BOOL, _OBJ = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "object"}
_POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"metadata": _OBJ, "spec": {
        "type": "object", "required": ["containers"],
        "properties": {"containers": {"type": "array", "minItems": 1,
                                      "items": {"type": "object", "required": ["name", "image"]}},
                       "volumes": {"type": "array"}}}},
}
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
KUBERAY_CRD_FIELDS = {
    "RayClusterSpec": {
        "type": "object", "required": ["headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions"],
        "additionalProperties": False,
        "properties": {
            "rayVersion": _STR, "enableInTreeAutoscaling": _BOOL, "autoscalerOptions": _OBJ,
            "headServiceAnnotations": _OBJ, "suspend": _BOOL, "managedBy": _STR, "upgradeStrategy": _OBJ,
            "gcsFaultToleranceOptions": _OBJ,
            "authOptions": {"type": "object", "required": ["mode"], "additionalProperties": False,
                            "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": _STR}},
            "headGroupSpec": {
                "type": "object", "required": ["template"], "additionalProperties": False,
                "properties": {"template": _POD_TEMPLATE, "rayStartParams": _RAY_START_PARAMS,
                               "serviceType": _STR, "headService": _OBJ, "enableIngress": _BOOL}},
            "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
                "properties": {"groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
                               "idleTimeoutSeconds": _INT, "rayStartParams": _RAY_START_PARAMS,
                               "template": _POD_TEMPLATE, "numOfHosts": _INT, "suspend": _BOOL,
                               "scaleStrategy": _OBJ}}},
        },
    },
}
KUBERAY_CRD_FIELDS["RayJobSpec"] = {
    "type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
    "properties": {
        "entrypoint": _STR, "runtimeEnvYAML": _STR, "jobId": _STR, "metadata": _OBJ, "clusterSelector": _OBJ,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": _BOOL, "ttlSecondsAfterFinished": _INT, "activeDeadlineSeconds": _INT,
        "backoffLimit": _INT, "suspend": _BOOL, "submitterPodTemplate": _OBJ, "submitterConfig": _OBJ,
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": _STR, "deletionStrategy": _OBJ, "managedBy": _STR,
        "rayClusterSpec": KUBERAY_CRD_FIELDS["RayClusterSpec"],
    },
}


def _resource(kind: str, spec_schema: str) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["name"]},
                           "spec": KUBERAY_CRD_FIELDS[spec_schema]}}


def _cluster_spec(path: Path) -> dict:
    docs = _docs(path)
    if path == RAYJOB:
        return _kind(docs, "RayJob")["spec"]["rayClusterSpec"]
    return _kind(docs, "RayCluster")["spec"]


def _pods(path: Path) -> list[dict]:
    """The pod specs of the head and of every worker group."""
    spec = _cluster_spec(path)
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def _ray_containers(path: Path) -> list[dict]:
    return [c for pod in _pods(path) for c in pod["containers"]]


@pytest.mark.parametrize("path,kind,spec", [(RAYCLUSTER, "RayCluster", "RayClusterSpec"),
                                            (RAYJOB, "RayJob", "RayJobSpec")], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_matches_the_crd_fields(path, kind, spec):
    resource = _kind(_docs(path), kind)
    validator = jsonschema.Draft7Validator(_resource(kind, spec))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]
    assert errors == []


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_cluster_has_what_raymia_relies_on(path):
    spec = _cluster_spec(path)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    assert all(g.get("minReplicas", 0) >= 1 for g in gpu_groups), "the bank pool needs GPU pods alive at start"

    pvc_claims = {d["metadata"]["name"]: d for d in _docs(path) if d.get("kind") == "PersistentVolumeClaim"}
    shared_paths = []
    for pod in _pods(path):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        shm = [n for n, p in mounts.items() if p == "/dev/shm"]
        assert len(shm) == 1, mounts
        assert volumes[shm[0]].get("emptyDir", {}).get("medium") == "Memory", volumes[shm[0]]
        claims = {n: v["persistentVolumeClaim"]["claimName"] for n, v in volumes.items() if "persistentVolumeClaim" in v}
        assert len(claims) == 1, claims
        (vol, claim), = claims.items()
        assert "ReadWriteMany" in pvc_claims[claim]["spec"]["accessModes"], claim
        shared_paths.append(mounts[vol])
    assert len(set(shared_paths)) == 1, f"the shared volume must be mounted at one path on every pod: {shared_paths}"
    assert len({c["image"] for c in _ray_containers(path)}) == 1


def _set_values(command: str) -> dict[str, str]:
    words = shlex.split(command)
    return dict(w.split("=", 1) for a, w in zip(words, words[1:]) if a == "--set")


def _services(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}


def _fqdn(service: dict) -> str:
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"


def _secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
            for d in _docs(MLFLOW_K8S) if d.get("kind") == "Secret"}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _check_storage_url(url: str, postgres: dict):
    parts = urlsplit(url)
    assert parts.scheme in ("postgresql", "postgresql+psycopg2"), f"sweep.storage must be PostgreSQL, got {url}"
    assert parts.password is None, "no password in sweep.storage: raymia logs the spec to MLflow"
    assert parts.hostname == _fqdn(postgres) and parts.port == postgres["spec"]["ports"][0]["port"], url
    assert parts.path == "/optuna", url


def test_rayjob_entrypoint_uses_the_shared_volume_mlflow_service_and_postgres():
    mlflow_docs = _docs(MLFLOW_K8S)
    services = _services(mlflow_docs)
    job = _kind(_docs(RAYJOB), "RayJob")
    sets = _set_values(job["spec"]["entrypoint"])
    shared = {m["mountPath"] for c in _ray_containers(RAYJOB) for m in c["volumeMounts"] if m["mountPath"] != "/dev/shm"}
    assert sets["output_dir"].startswith(shared.pop() + "/")
    assert sets["bank.device"] == "cuda"
    tracking = urlsplit(sets["tracking.uri"])
    assert tracking.hostname == _fqdn(services["mlflow"]) and tracking.port == services["mlflow"]["spec"]["ports"][0]["port"]
    _check_storage_url(sets["sweep.storage"], services["postgres"])


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_head_pod_gets_the_optuna_password_from_the_secret(path):
    head = _cluster_spec(path)["headGroupSpec"]["template"]["spec"]["containers"][0]
    ref = _env(head)["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _secret_keys()[ref["name"]]
    assert "optuna" in ref["key"]


def test_every_sweep_storage_in_the_docs_and_manifests_is_postgresql():
    services = _services(_docs(MLFLOW_K8S))
    found = []
    for p in sorted(CLUSTERS.iterdir()):
        if p.suffix in (".md", ".yaml"):
            for url in re.findall(r"sweep\.storage=([^\s`'\",]+)", p.read_text()):
                found.append(url)
                assert not url.startswith("sqlite"), f"{p.name}: {url}"
                assert urlsplit(url).scheme == "postgresql" and urlsplit(url).password is None, f"{p.name}: {url}"
                if "svc.cluster.local" in url:
                    _check_storage_url(url, services["postgres"])
    assert len(found) >= 4, found  # README (launcher, KubeRay, resume), the RayJob, the RayCluster, the launchers


# ---------------------------------------------------------------------------------------------------------
# MLflow on Kubernetes


def _mlflow_container() -> dict:
    return _kind(_docs(MLFLOW_K8S), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def _server_options(container: dict) -> dict[str, str]:
    words = container.get("command", []) + container.get("args", [])
    assert words[:2] == ["mlflow", "server"], words
    opts, rest = {}, words[2:]
    for i, w in enumerate(rest):
        if w.startswith("--"):
            key, eq, val = w.partition("=")
            opts[key] = val if eq else (rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else "")
    return opts


def _allowed(patterns: list[str], host: str) -> bool:
    """MLflow's Host header check (mlflow/server/security_utils.py is_allowed_host_header): exact, or fnmatch
    where the pattern has a '*'."""
    return "*" in patterns or any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns)


def test_mlflow_server_is_reachable_under_its_service_name():
    docs = _docs(MLFLOW_K8S)
    services = _services(docs)
    svc = services["mlflow"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    container = _mlflow_container()
    opts = _server_options(container)
    assert opts["--host"] == "0.0.0.0"  # the Service forwards to the pod address
    raw = opts.get("--allowed-hosts") or _env(container).get("MLFLOW_SERVER_ALLOWED_HOSTS", {}).get("value", "")
    patterns = [h.strip() for h in raw.split(",") if h.strip()]
    assert patterns and "*" not in patterns, raw
    port = svc["spec"]["ports"][0]["port"]
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    for host in (f"{name}.{ns}.svc.cluster.local:{port}", f"{name}.{ns}.svc:{port}", f"{name}.{ns}:{port}",
                 f"{name}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"):
        assert _allowed(patterns, host), host
    assert not _allowed(patterns, f"evil.example.com:{port}")
    # the URI every Ray-side file gives raymia is admitted
    for p in (RAYJOB, RAYCLUSTER, README):
        for uri in re.findall(r"tracking\.uri=(http://[^\s`'\",]*svc[^\s`'\",]*)", p.read_text()):
            assert _allowed(patterns, urlsplit(uri).netloc), f"{p.name}: {uri}"


def test_mlflow_uses_postgres_with_the_password_from_the_secret():
    docs = _docs(MLFLOW_K8S)
    services = _services(docs)
    container = _mlflow_container()
    opts = _server_options(container)
    store = urlsplit(opts["--backend-store-uri"])
    assert store.scheme == "postgresql" and store.password is None
    assert store.hostname == _fqdn(services["postgres"]) and store.path == "/mlflow"
    assert opts.get("--artifacts-destination") or opts.get("--default-artifact-root")
    ref = _env(container)["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _secret_keys()[ref["name"]]

    postgres = [d for d in docs if d.get("kind") in ("StatefulSet", "Deployment") and d["metadata"]["name"] == "postgres"]
    assert len(postgres) == 1
    pod = postgres[0]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    templates = {t["metadata"]["name"] for t in postgres[0]["spec"].get("volumeClaimTemplates", [])}
    pvcs = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    assert claims | templates and claims <= pvcs, (claims, pvcs)  # the database is on a persistent volume
    assert services["postgres"]["spec"]["selector"] == postgres[0]["spec"]["template"]["metadata"]["labels"]
    for c in pod["containers"]:
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["key"] in _secret_keys()[ref["name"]], ref
    init = "\n".join(v for d in docs if d.get("kind") == "ConfigMap" for v in d["data"].values())
    for db in ("mlflow", "optuna"):
        assert re.search(rf"CREATE DATABASE {db}\b", init), db


def test_nothing_is_exposed_outside_the_kubernetes_cluster():
    for path in (MLFLOW_K8S, RAYCLUSTER, RAYJOB):
        for d in _docs(path):
            assert d.get("kind") != "Ingress", path.name
            if d.get("kind") == "Service":
                assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    for path in (RAYCLUSTER, RAYJOB):
        head = _cluster_spec(path)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)


# ---------------------------------------------------------------------------------------------------------
# clusters/README.md


def test_readme_documents_resuming_and_localhost_access():
    text = README.read_text()
    assert not re.search(r"does not resume|starts a new Optuna study", text), "stale: a re-run continues a sweep"
    assert "## Resuming a sweep" in text
    assert "--fresh" in text
    assert "kubectl -n raymia port-forward svc/mlflow" in text and "port-forward svc/raymia-head-svc" in text
    assert "RAY_AUTH_MODE=token" in text
