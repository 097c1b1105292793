"""Every manifest in k8s/ and every rendered one passes the KubeRay v1 CRD schemas and the operator-only
rules; broken manifests fail with a message naming the field; shipped examples equal what render makes."""

import copy
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import k8s, k8s_checks
from orchestrator.config import load_pipeline
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))


def test_schemas_are_found(monkeypatch):
    """A missing schema directory must fail the suite, never skip it. The schemas are the package's
    own copies (k8s/schemas/kuberay/), not anything elsewhere on the machine."""
    monkeypatch.delenv(k8s_checks.SCHEMAS_ENV, raising=False)
    assert Path(str(k8s_checks.schema_dir())).resolve() == ROOT / "k8s/schemas/kuberay"
    for name in k8s_checks.CRD_FILES:
        assert (k8s_checks.schema_dir() / name).is_file()


def test_vendored_schemas_match_their_provenance():
    """PROVENANCE.md names each file's upstream path, sha1 and size; the files are those bytes."""
    provenance = (ROOT / "k8s/schemas/kuberay/PROVENANCE.md").read_text()
    assert re.search(r"release: \*\*v\d+\.\d+\.\d+\*\*", provenance) and re.search(r"commit `[0-9a-f]{40}`", provenance)
    for name in k8s_checks.CRD_FILES:
        path = ROOT / "k8s/schemas/kuberay" / name
        row = re.search(rf"^\| `{re.escape(name)}` \| `helm-chart/kuberay-operator/crds/{re.escape(name)}` \| "
                        r"`([0-9a-f]{40})` \| (\d+) \|$", provenance, re.M)
        assert row, f"PROVENANCE.md has no row for {name}"
        assert hashlib.sha1(path.read_bytes()).hexdigest() == row.group(1), name
        assert path.stat().st_size == int(row.group(2)) < 5_000_000, name


def test_schema_override_and_missing_schema(monkeypatch, tmp_path):
    """RAYRLHF_KUBERAY_SCHEMAS points the validator at another copy; a missing one is a UserError naming it."""
    monkeypatch.setenv(k8s_checks.SCHEMAS_ENV, str(tmp_path))
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "ray.io_rayjobs.yaml"))):
        k8s_checks.schema_dir()
    shutil.copy(ROOT / "k8s/schemas/kuberay/ray.io_rayjobs.yaml", tmp_path)
    assert k8s_checks.schema_dir() == tmp_path
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "ray.io_rayclusters.yaml"))):
        k8s_checks.check_manifest(_cluster())
    job = _job()
    assert k8s_checks.check_manifest(job) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_shipped_manifest_is_valid(path):
    docs = k8s_checks.load_manifests(path)
    assert docs
    assert k8s_checks.check_files([path]) == []


def test_shipped_set_is_complete():
    kinds = {d["kind"] for p in MANIFESTS for d in k8s_checks.load_manifests(p)}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim",
            "ConfigMap"} <= kinds


@pytest.mark.parametrize("pipeline", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_rendered_job_for_every_shipped_pipeline_is_valid(pipeline, tmp_path):
    text = k8s.render_pipeline_job(load_pipeline(pipeline), pipeline_path=str(pipeline),
                                   run_id="20261124-120000-abcdef")
    out = tmp_path / "job.yaml"
    out.write_text(text)
    assert k8s_checks.check_files([out]) == []
    configmap, job = k8s_checks.load_manifests(out)
    assert len(job["metadata"]["name"]) <= 47
    spec = job["spec"]
    assert (spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"]
            and spec["activeDeadlineSeconds"] > 0)
    (tmp_path / "p.yaml").write_text(configmap["data"]["pipeline.yaml"])
    assert load_pipeline(tmp_path / "p.yaml").run_dir == "/mnt/runs"
    assert "--run-id 20261124-120000-abcdef" in spec["entrypoint"]


def test_render_sizes_the_worker_groups_from_the_plan(tmp_path):
    """A GPU pipeline gets GPU pods big enough for its largest placement group."""
    config = load_pipeline(ROOT / "pipelines/ppo.yaml", [
        "stages.ppo.trainer.num_workers=4", "stages.ppo.trainer.gpus_per_worker=1",
        "stages.ppo.trainer.cpus_per_worker=2", "stages.ppo.rollout.gpus_per_worker=1",
        "stages.ppo.rollout.num_workers=2", "stages.ppo.schedule.samples_per_microbatch=32"])
    job = yaml.safe_load_all(k8s.render_pipeline_job(config, pipeline_path="ppo.yaml", run_id="r1"))
    spec = list(job)[1]["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_pod = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpu_pod) >= 4  # the trainer's 4 ranks share one placement group
    assert groups["gpu"]["replicas"] * int(gpu_pod) >= 6  # trainer 4 + rollout 2 (+ critic, ...) fit
    assert groups["gpu"]["minReplicas"] == groups["gpu"]["replicas"] == groups["gpu"]["maxReplicas"]


def test_quickstart_example_is_what_render_makes():
    """k8s/rayjob-quickstart.yaml is generated; regenerate it with the command in its header."""
    shipped = (ROOT / "k8s/rayjob-quickstart.yaml").read_text()
    command = re.search(r"rlhf k8s render (\S+) --run-id (\S+)", shipped)
    assert command, "the header names the command that made the file"
    fresh = k8s.render_pipeline_job(load_pipeline(ROOT / command.group(1)), pipeline_path=command.group(1),
                                    run_id=command.group(2))
    assert shipped == fresh, ("stale: run `rlhf k8s render pipelines/quickstart.yaml --run-id example "
                              "-o k8s/rayjob-quickstart.yaml`")


def test_ray_versions_agree():
    """The Dockerfile's base image, the manifests' rayVersion and the pyproject pin name one Ray."""
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", (ROOT / "deploy/Dockerfile").read_text(), re.M).group(1)
    pin = re.search(r'"ray\[[^\]]*\]==(\d+\.\d+)\.\*"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert base.startswith(pin + ".")
    versions = {d["spec"].get("rayVersion") or d["spec"].get("rayClusterConfig", {}).get("rayVersion")
                or d["spec"]["rayClusterSpec"]["rayVersion"]
                for p in MANIFESTS for d in k8s_checks.load_manifests(p) if d["kind"] in k8s_checks.KUBERAY_KINDS}
    assert versions == {base}


def test_services_stay_inside_the_cluster():
    for path in MANIFESTS:
        for doc in k8s_checks.load_manifests(path):
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
    mlflow = next(d for d in k8s_checks.load_manifests(ROOT / "k8s/mlflow.yaml") if d["kind"] == "Deployment")
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert re.search(r"--allowed-hosts=\S*rayrlhf-mlflow", args)
    assert "--backend-store-uri=sqlite:" in args or "--backend-store-uri=postgresql" in args


def _cluster():
    return copy.deepcopy(k8s_checks.load_manifests(ROOT / "k8s/raycluster.yaml")[0])


def _job():
    return copy.deepcopy(k8s_checks.load_manifests(ROOT / "k8s/rayjob-quickstart.yaml")[1])


BROKEN = {
    "schema type": (_cluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="one"),
                    "spec.workerGroupSpecs[0].minReplicas: 'one' is not of type 'integer'"),
    "schema required": (_cluster, lambda d: d["spec"]["workerGroupSpecs"][1].pop("groupName"),
                        "spec.workerGroupSpecs[1]: 'groupName' is a required property"),
    "unknown field": (_job, lambda d: d["spec"].update(shutdownAfterJobFinish=True),
                      "spec: unknown field 'shutdownAfterJobFinish'"),
    "unknown nested field": (_cluster,
                             lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                                 imagePullPolicyy="Always"),
                             "spec.headGroupSpec.template.spec.containers[0]: unknown field 'imagePullPolicyy'"),
    "name length": (_job, lambda d: d["metadata"].update(name="rlhf-" + "x" * 43),
                    "metadata.name: 'rlhf-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' is 48 characters; "
                    "KubeRay allows at most 47"),
    "name dns": (_cluster, lambda d: d["metadata"].update(name="RayRLHF_1"),
                 "metadata.name: 'RayRLHF_1' is not a DNS-1035 label"),
    "ttl without shutdown": (_job, lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                             "spec.ttlSecondsAfterFinished: a TTL needs spec.shutdownAfterJobFinishes: true"),
    "min above max": (_cluster, lambda d: d["spec"]["workerGroupSpecs"][1].update(minReplicas=5, maxReplicas=4),
                      "spec.workerGroupSpecs[1].minReplicas: 5 is above maxReplicas 4"),
    "replicas outside": (_job, lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=3),
                         "spec.rayClusterSpec.workerGroupSpecs[0].replicas: 3 is outside "
                         "[minReplicas 1, maxReplicas 1]"),
    "load balancer": (_cluster, lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
                      "spec.headGroupSpec.serviceType: LoadBalancer; the dashboard and client ports stay ClusterIP"),
    "version mismatch": (_cluster, lambda d: d["spec"].update(rayVersion="2.59.0"),
                         "spec.workerGroupSpecs[0].template.spec.containers[0].image: its tag carries Ray 2.60.0 "
                         "but rayVersion is 2.59.0"),
    "gpu limits": (_cluster,
                   lambda d: d["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"][
                       "limits"].pop("nvidia.com/gpu"),
                   "spec.workerGroupSpecs[1].template.spec.containers[0].resources.limits: "
                   "a GPU group needs nvidia.com/gpu"),
    "deadline": (_job, lambda d: d["spec"].update(activeDeadlineSeconds=0),
                 "spec.activeDeadlineSeconds: must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_fails_naming_the_field(case):
    make, breaks, expected = BROKEN[case]
    doc = make()
    assert k8s_checks.check_manifest(doc) == []
    breaks(doc)
    problems = k8s_checks.check_manifest(doc)
    assert any(expected in p for p in problems), problems


def test_broken_service_type_and_cli_exit_2(tmp_path):
    service = next(d for d in k8s_checks.load_manifests(ROOT / "k8s/mlflow.yaml") if d["kind"] == "Service")
    service["spec"]["type"] = "NodePort"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(service))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "k8s", "validate", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Service/rayrlhf-mlflow: spec.type: NodePort; platform services stay ClusterIP" in proc.stderr


def test_rayservice_points_at_builders_that_exist():
    doc = k8s_checks.load_manifests(ROOT / "k8s/rayservice.yaml")[0]
    apps = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert {a["import_path"] for a in apps} == {"deploy.serve_app:build_policy_app",
                                                "deploy.serve_app:build_reward_app"}
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("build_reward_app", "build_nothing")
    assert any("import_path: 'deploy.serve_app:build_nothing' does not exist" in p
               for p in k8s_checks.check_manifest(doc))


def test_render_refuses_an_image_of_another_ray_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "k8s", "render", "pipelines/sft.yaml",
                           "--image", "ghcr.io/me/rayrlhf:0.1.0-ray2.61.0-gpu", "-o", str(tmp_path / "job.yaml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "image: its tag carries Ray 2.61.0 but rayVersion is 2.60.0" in proc.stderr
    assert not (tmp_path / "job.yaml").exists()
