"""Checks of KubeRay manifests before ``kubectl apply`` (``rlhf k8s validate``, and every manifest
``rlhf k8s render`` prints).

``check_manifest`` validates KubeRay objects against the v1 CRD ``openAPIV3Schema`` and adds the
rules only the operator enforces (``ray-operator/controllers/ray/utils/validation.go``) plus ours:
names of 47 characters at most and DNS-1035; a TTL needs ``shutdownAfterJobFinishes``; a positive
``activeDeadlineSeconds``; ``minReplicas <= replicas <= maxReplicas``; resources not both in
``rayStartParams`` and ``resources``; token auth needs Ray >= 2.52; every Service ClusterIP; the
image tag's Ray version equal to ``rayVersion``; GPU worker groups with ``nvidia.com/gpu`` limits.

The KubeRay CRD schemas are package data of the ``k8s`` package (``k8s/schemas/kuberay/``), read
through ``importlib.resources``; nothing is looked up outside the package except the
``RAYRLHF_KUBERAY_SCHEMAS`` override.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import UserError

DATA_PACKAGE = "k8s"  # the manifests and k8s/schemas/kuberay/, shipped as package data
SCHEMAS_ENV = "RAYRLHF_KUBERAY_SCHEMAS"  # optional: check against another copy of the CRDs
CRD_FILES = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml", "ray.io_rayservices.yaml")
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
MAX_NAME = 47  # KubeRay: MaxRayClusterNameLength / MaxRayJobNameLength / MaxRayServiceNameLength
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def data_file(*parts: str) -> Traversable:
    """A file of the shipped ``k8s/`` package data (``data_file("raycluster.yaml")``)."""
    try:
        return resources.files(DATA_PACKAGE).joinpath(*parts)
    except ModuleNotFoundError:
        raise UserError(f"the {DATA_PACKAGE!r} package data (manifest templates, KubeRay CRD schemas) is not "
                        "installed; reinstall rayrlhf (pip install rayrlhf, or pip install -e . in a checkout)"
                        ) from None


def load_manifests(path: Path | Traversable | str) -> list[dict[str, Any]]:
    try:
        source = Path(path) if isinstance(path, (str, os.PathLike)) else path
        docs = [d for d in yaml.safe_load_all(source.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read manifests ({exc})") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or "kind" not in doc:
            raise UserError(f"{path}: document {i} is not a Kubernetes object (no kind)")
    return docs


def schema_dir() -> Path | Traversable:
    """Where the KubeRay CRDs are: $RAYRLHF_KUBERAY_SCHEMAS when set (a newer KubeRay's CRDs, say), else
    the copies vendored as package data in ``k8s/schemas/kuberay/`` (see PROVENANCE.md there)."""
    env = os.environ.get(SCHEMAS_ENV)
    path = Path(env) if env else data_file("schemas", "kuberay")
    if not path.joinpath(CRD_FILES[0]).is_file():
        where = f"{SCHEMAS_ENV}={env}" if env else "the rayrlhf package data (reinstall rayrlhf)"
        raise UserError(f"KubeRay CRD schemas not found: {path.joinpath(CRD_FILES[0])} does not exist ({where}); "
                        f"set {SCHEMAS_ENV} to a directory holding the CRD files ({', '.join(CRD_FILES)})")
    return path


def crd_schema(kind: str) -> dict[str, Any]:
    path = schema_dir().joinpath(f"ray.io_{KUBERAY_KINDS[kind]}.yaml")
    if not path.is_file():
        raise UserError(f"KubeRay CRD schema not found: {path} does not exist")
    if str(path) not in _SCHEMAS:  # each CRD is 1-1.4 MB of YAML: parse it once per process
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
        _SCHEMAS[str(path)] = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _SCHEMAS[str(path)]


_SCHEMAS: dict[str, dict[str, Any]] = {}


def check_manifest(doc: dict[str, Any]) -> list[str]:
    """Every problem of one object, each naming its field path (``spec.workerGroupSpecs[0].minReplicas``)."""
    kind = doc.get("kind")
    where = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
    problems = [f"{where}: {p}" for p in _schema_problems(doc)] if kind in KUBERAY_KINDS else []
    if not problems:  # the operator rules read fields the schema has already checked
        problems += [f"{where}: {p}" for p in _rules(doc)]
    return problems


def operator_problems(doc: dict[str, Any]) -> list[str]:
    """The operator-only and platform rules alone (no CRD schema needed), prefixed like check_manifest."""
    where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"
    return [f"{where}: {p}" for p in _rules(doc)]


def _schema_problems(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = crd_schema(doc["kind"])
    validator = jsonschema.Draft4Validator(schema)
    problems = [f"{_path(e.absolute_path) or '(top level)'}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    return problems + _unknown_fields(doc, schema, [])


def _unknown_fields(value: Any, schema: dict[str, Any], at: list[Any]) -> list[str]:
    """Fields the schema does not know. The API server prunes them silently (or rejects them under
    strict field validation), so a typo such as ``shutdownAfterJobFinish`` would lose the setting."""
    problems = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        known = schema["properties"]
        for key, item in value.items():
            if key in known:
                problems += _unknown_fields(item, known[key], [*at, key])
            elif not schema.get("additionalProperties"):
                problems.append(f"{_path(at) or '(top level)'}: unknown field {key!r}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            problems += _unknown_fields(item, schema["additionalProperties"], [*at, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += _unknown_fields(item, schema["items"], [*at, i])
    return problems


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _rules(doc: dict[str, Any]) -> list[str]:
    kind, spec, name = doc["kind"], doc.get("spec") or {}, (doc.get("metadata") or {}).get("name", "")
    problems = []
    if kind in KUBERAY_KINDS:
        if len(name) > MAX_NAME:
            problems.append(f"metadata.name: {name!r} is {len(name)} characters; KubeRay allows at most {MAX_NAME}")
        if not DNS1035.match(name):
            problems.append(f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits, '-'; starts "
                            "with a letter)")
    if kind == "RayJob":
        problems += _job_rules(spec)
        if spec.get("rayClusterSpec"):
            problems += _cluster_rules(spec["rayClusterSpec"], "spec.rayClusterSpec")
    elif kind == "RayCluster":
        problems += _cluster_rules(spec, "spec")
    elif kind == "RayService":
        problems += _cluster_rules(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig")
        problems += _serve_config_rules(spec.get("serveConfigV2"))
    elif kind == "Service" and spec.get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"spec.type: {spec['type']}; platform services stay ClusterIP (use kubectl port-forward or "
                        "an authenticated ingress)")
    return problems


def _job_rules(spec: dict[str, Any]) -> list[str]:
    problems = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        problems.append("spec.ttlSecondsAfterFinished: a TTL needs spec.shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not shutdown:
        problems.append("spec.suspend: suspending needs spec.shutdownAfterJobFinishes: true")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        problems.append("spec.activeDeadlineSeconds: must be a positive integer")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        problems.append("spec: one of rayClusterSpec or clusterSelector must be set")
    if spec.get("runtimeEnvYAML"):
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            problems.append(f"spec.runtimeEnvYAML: not valid YAML ({exc})")
    return problems


def _cluster_rules(spec: dict[str, Any], at: str) -> list[str]:
    problems = []
    version = str(spec.get("rayVersion", ""))
    if (spec.get("authOptions") or {}).get("mode") == "token" and _version(version) < (2, 52, 0):
        problems.append(f"{at}.rayVersion: token auth (authOptions.mode: token) needs Ray >= 2.52.0, got {version!r}")
    head = spec.get("headGroupSpec") or {}
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{at}.headGroupSpec.serviceType: {head['serviceType']}; the dashboard and client ports stay "
                        "ClusterIP (port-forward to reach them)")
    groups = [(f"{at}.headGroupSpec", head)] + [
        (f"{at}.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for where, group in groups:
        problems += _group_rules(group, where, version)
    return problems


def _group_rules(group: dict[str, Any], where: str, ray_version: str) -> list[str]:
    problems = []
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        return [f"{where}.template.spec.containers: at least one container is needed"]
    start = group.get("rayStartParams") or {}
    if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
        problems.append(f"{where}.resources: set resources in rayStartParams or in resources, not both")
    if "minReplicas" in group or "maxReplicas" in group:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if low > high:
            problems.append(f"{where}.minReplicas: {low} is above maxReplicas {high}")
        if "replicas" in group and not low <= group["replicas"] <= high:
            problems.append(f"{where}.replicas: {group['replicas']} is outside [minReplicas {low}, maxReplicas {high}]")
    tag_version = re.search(r"ray(\d+\.\d+\.\d+)", str(containers[0].get("image", "")).rsplit(":", 1)[-1])
    if ray_version and tag_version and tag_version.group(1) != ray_version:
        problems.append(f"{where}.template.spec.containers[0].image: its tag carries Ray {tag_version.group(1)} but "
                        f"rayVersion is {ray_version}")
    if group.get("groupName") == "gpu":
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        if "nvidia.com/gpu" not in limits:
            problems.append(f"{where}.template.spec.containers[0].resources.limits: a GPU group needs nvidia.com/gpu")
    return problems


def _serve_config_rules(config: Any) -> list[str]:
    if not isinstance(config, str):
        return ["spec.serveConfigV2: a YAML string with the Serve applications is required"]
    try:
        parsed = yaml.safe_load(config)
    except yaml.YAMLError as exc:
        return [f"spec.serveConfigV2: not valid YAML ({exc})"]
    apps = (parsed or {}).get("applications") or []
    if not apps:
        return ["spec.serveConfigV2.applications: at least one application is needed"]
    problems = []
    for i, app in enumerate(apps):
        module, _, attr = str(app.get("import_path", "")).partition(":")
        if module.split(".")[0] not in ("deploy", "orchestrator"):
            continue
        path = _module_source(module)
        if path is None or f"def {attr}(" not in path.read_text():
            problems.append(f"spec.serveConfigV2.applications[{i}].import_path: {app.get('import_path')!r} "
                            "does not exist")
    return problems


def _module_source(module: str) -> Traversable | None:
    """The source file of ``module`` of this distribution (found without importing it), or None."""
    top, *rest = module.split(".")
    try:
        package = resources.files(top)
    except (ModuleNotFoundError, TypeError):
        return None
    for candidate in ([*rest[:-1], f"{rest[-1]}.py"], [*rest, "__init__.py"]) if rest else (["__init__.py"],):
        path = package.joinpath(*candidate)
        if path.is_file():
            return path
    return None


def _version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)[:3]
    return tuple(int(p) for p in parts) if parts else (0,)


def check_files(paths: list[Path]) -> list[str]:
    """Every problem in every document of ``paths``, prefixed with the file."""
    problems = []
    for path in paths:
        for doc in load_manifests(path):
            problems += [f"{path}: {p}" for p in check_manifest(doc)]
    return problems


