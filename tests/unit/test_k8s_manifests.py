"""k8s/: the Dockerfile, the kustomize base and overlays, checked the ways a cluster would check them.

Core kinds and every Ray pod template are validated against the Kubernetes schemas
(kubernetes-validate); RayCluster/RayJob/RayCronJob against the KubeRay ray.io/v1 Go types
recorded in tests/data/kuberay_v1_fields.json (KubeRay master after v1.6; see its "source").
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["cpu", "gpu"]
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes these manifests claim (CronJob timeZone is GA in 1.27)
KUBERAY = json.loads((ROOT / "tests" / "data" / "kuberay_v1_fields.json").read_text())
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed here: `kubectl kustomize` (built-in kustomize) checks the overlays")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / request.param)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def cluster_specs(doc: dict) -> list[dict]:
    """The RayClusterSpec(s) a Ray resource carries."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return [doc["spec"]["jobTemplate"]["rayClusterSpec"]]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


def test_every_manifest_file_parses():
    files = [*K8S.rglob("*.yaml"), ROOT / "configs" / "kustomization.yaml"]
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_overlays_render_every_resource(rendered):
    _, docs = rendered
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for job in ("translate", "encode", "ood-fit", "ood-sample"):
        assert ("RayJob", f"latentshift-{job}") in names
    assert {("RayCluster", "latentshift"), ("RayCronJob", "latentshift-nightly"), ("CronJob", "latentshift-nightly"),
            ("ConfigMap", "latentshift-configs"), ("ServiceAccount", "latentshift")} <= names
    for d in docs:  # `kubectl apply -l latentshift.io/job in (shared,<job>)` selects by this label
        assert d["metadata"]["labels"].get("latentshift.io/job"), (d["kind"], d["metadata"]["name"])


def test_core_resources_and_pod_templates_validate_against_kubernetes_schemas(rendered):
    import kubernetes_validate

    _, docs = rendered
    core = [d for d in docs if d["kind"] not in RAY_KINDS]
    assert {d["kind"] for d in core} >= {"ConfigMap", "CronJob", "ServiceAccount", "Role", "RoleBinding"}
    for d in core:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    for d in docs:
        if d["kind"] in RAY_KINDS:
            for spec in cluster_specs(d):
                for template in pod_templates(spec):
                    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                    kubernetes_validate.validate(wrapped, KUBE_VERSION, strict=True)


def _go_type(type_str: str) -> str:
    """'*[]WorkerGroupSpec' → 'WorkerGroupSpec'; leaves corev1.* and scalars as they are."""
    return type_str.lstrip("*").removeprefix("[]").lstrip("*")


def check_kuberay_fields(value, type_name: str, where: str) -> list[str]:
    """Unknown or missing fields of ``value`` against the KubeRay Go type ``type_name`` (recursively)."""
    spec = KUBERAY["types"].get(type_name)
    if spec is None:  # corev1.* and scalars: checked elsewhere (pod templates) or not at all
        return []
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({type_name})"]
    fields = dict(spec["fields"])
    for inline in spec.get("inline", []):
        fields.update(KUBERAY["types"][inline]["fields"])
    problems = [f"{where}.{k}: not a field of KubeRay {type_name}" for k in value if k not in fields]
    problems += [f"{where}.{k}: required by KubeRay {type_name}" for k, f in fields.items()
                 if f.get("required") and k not in value]
    for key, sub in value.items():
        if key not in fields:
            continue
        t = fields[key]["type"]
        inner = _go_type(t)
        if "enum" in fields[key] and isinstance(sub, str):
            if sub not in fields[key]["enum"]:
                problems.append(f"{where}.{key} = {sub!r}: not one of {fields[key]['enum']}")
        if t.lstrip("*").startswith("[]"):
            for i, item in enumerate(sub or []):
                problems += check_kuberay_fields(item, inner, f"{where}.{key}[{i}]")
        else:
            problems += check_kuberay_fields(sub, inner, f"{where}.{key}")
    return problems


def test_ray_resources_use_only_fields_kuberay_v1_knows(rendered):
    _, docs = rendered
    ray_docs = [d for d in docs if d["kind"] in RAY_KINDS]
    assert {d["kind"] for d in ray_docs} == RAY_KINDS
    for d in ray_docs:
        assert d["apiVersion"] == "ray.io/v1"
        assert set(d) <= {"apiVersion", "kind", "metadata", "spec"}
        problems = check_kuberay_fields(d["spec"], KUBERAY["kinds"][d["kind"]], f"{d['kind']}/{d['metadata']['name']}")
        assert not problems, problems


def test_field_checker_catches_unknown_and_missing_fields():
    problems = check_kuberay_fields({"entrypoint": "x", "shutdownAfterJob": True,
                                     "rayClusterSpec": {"workerGroupSpecs": [{"groupName": "g"}]}}, "RayJobSpec", "j")
    assert "j.shutdownAfterJob: not a field of KubeRay RayJobSpec" in problems
    assert "j.rayClusterSpec.headGroupSpec: required by KubeRay RayClusterSpec" in problems
    assert "j.rayClusterSpec.workerGroupSpecs[0].template: required by KubeRay WorkerGroupSpec" in problems


def test_every_job_runs_on_the_clusters_spec_and_cleans_up(rendered):
    _, docs = rendered
    cluster = of_kind(docs, "RayCluster")[0]["spec"]
    jobs = [(d["metadata"]["name"], d["spec"]) for d in of_kind(docs, "RayJob")]
    jobs += [(d["metadata"]["name"], d["spec"]["jobTemplate"]) for d in of_kind(docs, "RayCronJob")]
    for name, spec in jobs:
        assert spec["rayClusterSpec"] == cluster, f"{name}: the overlay's replacement did not copy the cluster spec"
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 1, name
        assert spec["activeDeadlineSeconds"] > 0, name
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "configs", "mountPath": "/config", "readOnly": True} in head["volumeMounts"]
    assert not any("nvidia.com/gpu" in json.dumps(c.get("resources", {})) for c in
                   cluster["headGroupSpec"]["template"]["spec"]["containers"])  # the head has no GPU


def test_entrypoints_name_existing_job_files_and_configs(rendered):
    from pipeline.jobs import JOBS

    _, docs = rendered
    config_map = of_kind(docs, "ConfigMap")[0]
    assert config_map["metadata"]["name"] == "latentshift-configs"
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(config_map["data"]) == shipped  # every config is in the ConfigMap
    entrypoints = [d["spec"]["entrypoint"] for d in of_kind(docs, "RayJob")]
    entrypoints += [d["spec"]["jobTemplate"]["entrypoint"] for d in of_kind(docs, "RayCronJob")]
    assert len(entrypoints) == 14
    jobs = {Path(shlex.split(e)[1]).stem.replace("_", "-") for e in entrypoints}
    assert jobs == set(JOBS), "every registered job has a RayJob example"
    for entrypoint in entrypoints:
        argv = shlex.split(entrypoint)
        assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), entrypoint
        assert (ROOT / argv[1]).is_file(), entrypoint
        assert Path(argv[1]).stem.replace("_", "-") in JOBS, f"{entrypoint}: not a registered job"
        config = argv[argv.index("--config") + 1]
        assert config.startswith("/config/") and config.removeprefix("/config/") in config_map["data"], entrypoint


def test_shipped_configs_validate_with_the_entrypoints_overrides(rendered):
    from pipeline.config import load_config

    _, docs = rendered
    for d in of_kind(docs, "RayJob"):
        argv = shlex.split(d["spec"]["entrypoint"])
        config = ROOT / "configs" / argv[argv.index("--config") + 1].removeprefix("/config/")
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        load_config(config, sets)


def test_gpu_groups_request_gpus_and_autoscale_from_zero(rendered):
    overlay, docs = rendered
    cluster = of_kind(docs, "RayCluster")[0]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if overlay == "gpu":
            assert limits.get("nvidia.com/gpu") == "1" and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
            tolerations = group["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        else:
            assert "nvidia.com/gpu" not in json.dumps(group)
    head_env = {e["name"]: e["value"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["LATENTSHIFT_GPUS_PER_ACTOR"] == ("1" if overlay == "gpu" else "0")


SECRETISH = re.compile(r"(secret|password|token|access_key|accesskey|credential|api_key)", re.I)


def test_no_manifest_carries_credential_values(rendered):
    _, docs = rendered
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id

    def walk(node, path=""):
        if isinstance(node, dict):
            if "name" in node and "value" in node and SECRETISH.search(str(node["name"])):
                raise AssertionError(f"{path}: env {node['name']} has an inline value; use a Secret reference")
            if node.get("kind") == "Secret":
                raise AssertionError(f"{path}: a Secret with values in the manifests")
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    for d in docs:
        walk(d, f"{d['kind']}/{d['metadata']['name']}")
    refs = re.findall(r"secretRef:\s*\n\s*name: (\S+)\s*\n\s*optional: true", text)
    assert refs and set(refs) == {"latentshift-s3"}  # credentials only by reference, optional


def test_plain_cronjob_fires_from_a_suspended_template(rendered):
    _, docs = rendered
    cron = of_kind(docs, "CronJob")[0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    argv = pod["containers"][0]["command"]
    assert argv[:2] == ["latentshift", "fire-rayjob"]
    template = next(d for d in of_kind(docs, "RayJob") if d["metadata"]["name"] == argv[argv.index("--template") + 1])
    assert template["spec"]["suspend"] is True
    env = pod["containers"][0]["env"]
    assert {"name": "FIRING", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}} in env
    role = next(d for d in of_kind(docs, "Role") if d["metadata"]["name"] == "latentshift-scheduler")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "create"]}]
    assert pod["serviceAccountName"] == "latentshift-scheduler"


def test_dockerfile_builds_on_the_matching_ray_gpu_image_as_non_root():
    text = (K8S / "Dockerfile").read_text()
    ray_version = re.search(r'"ray\[[^\]]*\]>=([\d.]+)', (ROOT / "pyproject.toml").read_text()).group(1)
    arg = re.search(r"^ARG RAY_VERSION=([\d.]+)$", text, re.M).group(1)
    assert arg.startswith(ray_version)  # 2.60.0 for ray>=2.60
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    raycluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    assert raycluster["spec"]["rayVersion"] == arg
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs and not any("[dev]" in line for line in installs)
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, re.M):
        assert not SECRETISH.search(line), line
    assert "COPY --chown=ray:users jobs ./jobs" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
