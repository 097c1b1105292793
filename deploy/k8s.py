"""KubeRay: render a pipeline as a ready ``RayJob``, and a ``RayService`` for trained checkpoints
(``deploy.k8s_checks`` checks them, and any manifest, before ``kubectl apply``).

``render_pipeline_job`` starts from ``k8s/raycluster.yaml`` (image, pods, volumes, env: one source
for the long-lived cluster and the per-run ones), sizes its worker groups from the pipeline's
resource plan, and returns a ConfigMap holding the resolved pipeline plus a RayJob that runs it.
The templates are package data of the ``k8s`` package (``k8s/`` in a checkout, the installed
``k8s`` package from a wheel), read through ``importlib.resources``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from deploy.k8s_checks import MAX_NAME, data_file, load_manifests
from orchestrator.config import PipelineConfig
from pipelines.errors import UserError

PIPELINE_MOUNT = "/etc/rayrlhf"
RUNS_MOUNT = "/mnt/runs"
JOB_TTL_S = 3600
JOB_DEADLINE_S = 24 * 3600


# ---------------------------------------------------------------- rendering


def render_pipeline_job(config: PipelineConfig, *, pipeline_path: str, run_id: str | None = None,
                        image: str | None = None, namespace: str | None = None,
                        deadline_s: int = JOB_DEADLINE_S, template: Path | Traversable | None = None) -> str:
    """ConfigMap + RayJob (multi-document YAML) that run ``config`` on a cluster of its own."""
    from deploy.jobs import pipeline_yaml, submission_id_for
    from orchestrator.runner import new_run_id

    run_id = run_id or new_run_id()
    name = k8s_name(f"rlhf-{config.name}-{run_id}")
    if not Path(config.run_dir).is_absolute():
        config = config.model_copy(update={"run_dir": RUNS_MOUNT})  # the shared volume every pod mounts
    cluster_spec = sized_cluster_spec(_template_spec(template or data_file("raycluster.yaml")), config)
    if image:
        for container in _containers(cluster_spec):
            container["image"] = image
    _mount_pipeline(cluster_spec, configmap=f"{name}-pipeline")
    meta = {"name": name, "labels": {"app.kubernetes.io/name": "rayrlhf", "app.kubernetes.io/component": "pipeline",
                                     "rayrlhf.io/pipeline": k8s_name(config.name)}}
    if namespace:
        meta["namespace"] = namespace
    # The pods' MLFLOW_TRACKING_URI (k8s/raycluster.yaml) wins over the pipeline's tracking.uri.
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {**copy.deepcopy(meta), "name": f"{name}-pipeline"},
                 "data": {"pipeline.yaml": pipeline_yaml(config)}}
    job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta,
        "spec": {
            "entrypoint": f"python -m orchestrator.cli run {PIPELINE_MOUNT}/pipeline.yaml --run-id {run_id}",
            "jobId": submission_id_for(config.name, run_id),
            "metadata": {"rlhf.pipeline": config.name, "rlhf.run_id": run_id},
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "activeDeadlineSeconds": int(deadline_s),
            "backoffLimit": 0,
            "rayClusterSpec": cluster_spec,
        },
    }
    header = (f"# RayJob for pipeline {config.name!r} (run {run_id}), rendered by\n"
              f"#   rlhf k8s render {pipeline_path} --run-id {run_id}\n"
              f"# Apply with: kubectl apply -f <this file>;  follow: kubectl logs -f job/{name}\n")
    return header + dump_manifests([configmap, job])


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the pipeline in the ConfigMap) as readable ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False)


def _template_spec(template: Path | Traversable) -> dict[str, Any]:
    docs = [d for d in load_manifests(template) if d.get("kind") == "RayCluster"]
    if not docs:
        raise UserError(f"{template}: no RayCluster to take the cluster spec from")
    return copy.deepcopy(docs[0]["spec"])


def sized_cluster_spec(spec: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
    """``spec`` with fixed worker-group sizes that hold the pipeline's largest stage: GPU pods for
    the GPUs (each pod large enough for the largest placement group), CPU pods for the CPUs left."""
    from orchestrator.plan import plan_pipeline

    plans = plan_pipeline(config)
    peak = {k: max((p.peak()[k] for p in plans), default=0.0) for k in ("CPU", "GPU")}
    largest_gpu_group = max((g.total()["GPU"] for p in plans for g in p.groups), default=0.0)
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    gpu, cpu = groups.get("gpu"), groups.get("cpu")
    if gpu is None or cpu is None:
        raise UserError("the RayCluster template needs worker groups named 'cpu' and 'gpu'")
    gpu_limits = gpu["template"]["spec"]["containers"][0]["resources"]
    pod_gpus = max(int(gpu_limits["limits"].get("nvidia.com/gpu", 1)), math.ceil(largest_gpu_group))
    for section in ("requests", "limits"):
        gpu_limits.setdefault(section, {})["nvidia.com/gpu"] = str(pod_gpus)
    gpu_pods = math.ceil(peak["GPU"] / pod_gpus) if peak["GPU"] else 0
    gpu_pod_cpus = _cpus(gpu)
    cpu_pods = math.ceil(max(0.0, peak["CPU"] - gpu_pods * gpu_pod_cpus) / _cpus(cpu))
    for group, pods in ((gpu, gpu_pods), (cpu, cpu_pods)):
        group.update({"replicas": pods, "minReplicas": pods, "maxReplicas": pods})
    spec["enableInTreeAutoscaling"] = False  # a per-run cluster has the size its pipeline needs
    return spec


def _cpus(group: dict[str, Any]) -> float:
    value = str(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        yield from group["template"]["spec"]["containers"]


def _mount_pipeline(spec: dict[str, Any], configmap: str) -> None:
    pod = spec["headGroupSpec"]["template"]["spec"]
    pod.setdefault("volumes", []).append({"name": "pipeline", "configMap": {"name": configmap}})
    pod["containers"][0].setdefault("volumeMounts", []).append(
        {"name": "pipeline", "mountPath": PIPELINE_MOUNT, "readOnly": True})


def k8s_name(text: str) -> str:
    """A DNS-1035 label of at most 47 characters (KubeRay's limit) made from ``text``."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"r-{name}"
    return name[:MAX_NAME].rstrip("-")


def render_service(policy: str | None, *, reward_model: str | None = None, name: str = "rayrlhf-serve",
                   image: str | None = None, namespace: str | None = None, policy_gpus: int = 1,
                   template: Path | Traversable | None = None) -> str:
    """A RayService serving ``policy`` (OpenAI ``/v1/completions`` through ``ray.serve.llm`` on GPU
    pods) and/or ``reward_model`` (``/score``) from paths on the shared runs volume."""
    if not policy and not reward_model:
        raise UserError("render-service: give a policy checkpoint, a --reward-model, or both")
    apps = []
    if policy:
        apps.append({"name": "policy", "route_prefix": "/", "import_path": "deploy.serve_app:build_policy_app",
                     "args": {"checkpoint": policy, "engine": "serve-llm", "num_gpus": policy_gpus}})
    if reward_model:
        apps.append({"name": "reward", "route_prefix": "/score", "import_path": "deploy.serve_app:build_reward_app",
                     "args": {"reward": reward_model, "num_cpus": 1}})
    spec = _template_spec(template or data_file("raycluster.yaml"))
    for group in spec["workerGroupSpecs"]:
        wanted = 1 if (group["groupName"] == "gpu" and policy) or (group["groupName"] == "cpu" and reward_model) else 0
        group["minReplicas"] = group["replicas"] = wanted
    if image:
        for container in _containers(spec):
            container["image"] = image
    meta: dict[str, Any] = {"name": k8s_name(name), "labels": {"app.kubernetes.io/name": "rayrlhf",
                                                                "app.kubernetes.io/component": "serve"}}
    if namespace:
        meta["namespace"] = namespace
    service = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": meta,
               "spec": {"serveConfigV2": yaml.safe_dump({"applications": apps}, sort_keys=False),
                        "rayClusterConfig": spec}}
    header = ("# RayService serving trained checkpoints from the shared runs volume, rendered by\n"
              f"#   rlhf k8s render-service {policy or ''}{f' --reward-model {reward_model}' if reward_model else ''}\n"
              f"# Reach it inside the cluster at http://{meta['name']}-serve-svc:8000 (ClusterIP), or\n"
              f"#   kubectl port-forward svc/{meta['name']}-serve-svc 8000:8000\n")
    return header + dump_manifests([service])
