"""The wheel carries what `rlhf k8s render / validate` need (k8s/ manifests, the vendored KubeRay CRD
schemas and their provenance, pipelines/*.yaml), and deploy/k8s.py reads them from the installed
package, never from the checkout or from anywhere else on the machine."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.sanity

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml", "PROVENANCE.md"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the working tree (tracked files plus new ones git does not ignore).
    Building in place would write build/ (not ignored, and its stale build/lib files end up in later
    wheels) and rewrite rayrlhf.egg-info under the developer's feet."""
    tmp = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    src = tmp / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # skips files deleted in the working tree but still in the index
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp / "dist").glob("rayrlhf-*.whl")
    return path


def test_wheel_carries_manifests_schemas_and_pipelines(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"k8s/{p.name}" for p in (ROOT / "k8s").glob("*.yaml")}
    assert {"k8s/raycluster.yaml", "k8s/rayjob-quickstart.yaml", "k8s/rayservice.yaml"} <= expected
    expected |= {"k8s/__init__.py", "k8s/README.md", *(f"k8s/schemas/kuberay/{s}" for s in SCHEMAS)}
    expected |= {f"pipelines/{p.name}" for p in (ROOT / "pipelines").glob("*.yaml")}
    assert "pipelines/quickstart.yaml" in expected
    assert expected <= names, sorted(expected - names)
    with zipfile.ZipFile(wheel) as whl:  # byte-identical to the checkout's copies
        for name in expected:
            assert whl.read(name) == (ROOT / name).read_bytes(), name


@pytest.mark.parametrize("module", ["deploy/k8s.py", "deploy/k8s_checks.py"])
def test_deploy_k8s_looks_nothing_up_outside_the_package(module):
    source = (ROOT / module).read_text()
    tree = ast.parse(source)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    for bad in ("/work", "shared/", "/shared", "~/"):
        assert not [s for s in strings if bad in s], f"{module} names {bad!r}"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "__file__" not in names, "find package data with importlib.resources, not __file__"
    assert not {"parent", "parents", "cwd", "getcwd", "home", "expanduser"} & attrs


def test_installed_wheel_renders_and_validates_outside_the_checkout(wheel, tmp_path):
    """The wheel unpacked as site-packages would hold it, run from a directory outside the checkout:
    the package (not the checkout) answers, its schemas validate its manifests, and render works."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, deploy.k8s_checks as k, k8s, orchestrator.cli as cli\n"
        "from pathlib import Path\n"
        "print(k.__file__); print(k8s.__file__); print(k.schema_dir())\n"
        "manifests = sorted(Path(k8s.__file__).parent.glob('*.yaml'))\n"
        "assert len(manifests) >= 5, manifests\n"
        "sys.exit(cli.main(['k8s', 'validate', *map(str, manifests)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAYRLHF_KUBERAY_SCHEMAS"} | {"PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    module, data, schemas = proc.stdout.splitlines()[:3]
    assert module == str(site / "deploy/k8s_checks.py") and data == str(site / "k8s/__init__.py")
    assert schemas == str(site / "k8s/schemas/kuberay")
    render = ("import sys, orchestrator.cli as cli; "
              f"sys.exit(cli.main(['k8s', 'render', {str(site / 'pipelines/quickstart.yaml')!r}, '--run-id', 'x1']))")
    proc = subprocess.run([sys.executable, "-c", render], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kind: RayJob" in proc.stdout and "rayVersion:" in proc.stdout
