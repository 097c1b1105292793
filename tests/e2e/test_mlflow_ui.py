"""The MLflow UI as a user sees it: two finished pipeline runs (the quickstart's task and a short
SFT, two learning rates) in a real store, the real ``mlflow ui`` on 127.0.0.1, and Debian's headless
Chromium driven by Selenium to the experiment list, the runs page ``rlhf run`` prints, the parent
run, a stage's metric charts and the comparison of the two runs. Each page must show what the
pipeline logged; its screenshot is kept under ``test-artifacts/mlflow-ui/`` (``$RLHF_TEST_ARTIFACTS``).

``make test`` installs Chromium and ChromeDriver (Debian's ``chromium``, ``chromium-driver``); where
they are missing this test fails, it does not skip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from actors.net import free_port
from orchestrator.config import read_yaml, validate_pipeline
from orchestrator.runner import PipelineResult, run_pipeline
from orchestrator.runtime.tracking import runs_page

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RLHF_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "mlflow-ui"
NAME = "ui_check"
LEARNING_RATES = (1.0e-3, 2.0e-4)
PAGE_DEADLINE_S = 60.0
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1680,1500")


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _pipeline(tmp: Path, uri: str, lr: float) -> dict:
    """The quickstart's task stage (fewer rows) and its SFT stage cut to 40 steps."""
    raw = read_yaml(ROOT / "pipelines" / "quickstart.yaml")
    task, sft = raw["stages"][:2]
    task.update(num_sft=640, num_pairs=64, num_prompts=64, num_eval=48)
    sft["optim"]["lr"] = lr
    sft["optim"]["warmup_steps"] = 5
    sft["schedule"].update(steps=40, eval_every=20)
    return {"name": NAME, "seed": 0, "ray": {"num_cpus": 2}, "run_dir": str(tmp / "runs"), "stages": [task, sft],
            "tracking": {"uri": uri, "log_checkpoints": False, "system_metrics": False}}


@pytest.fixture(scope="module")
def two_runs(ray_local, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[PipelineResult]]:
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{tmp}/mlflow.db"
    return uri, [run_pipeline(validate_pipeline(_pipeline(tmp, uri, lr)), quiet=True) for lr in LEARNING_RATES]


@pytest.fixture(scope="module")
def mlflow_ui(two_runs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow ui`` on the runs' store, on 127.0.0.1; stopped (its process group, by its pid) after."""
    uri, _ = two_runs
    port = free_port("127.0.0.1")
    log = tmp_path_factory.mktemp("mlflow_ui_server") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow ui did not answer on {address}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = os.environ.get("RLHF_CHROMIUM") or shutil.which("chromium")
    driver_path = os.environ.get("RLHF_CHROMEDRIVER") or shutil.which("chromedriver")
    assert chromium and driver_path, ("Chromium and ChromeDriver are needed: `make test` installs Debian's "
                                      "chromium and chromium-driver (or set RLHF_CHROMIUM, RLHF_CHROMEDRIVER)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="rlhf-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _show(driver, url: str | None, shot: str, expect: list[str]) -> str:
    """Open ``url`` (None: stay), wait until the page's text holds every string of ``expect``, keep a screenshot."""
    from selenium.webdriver.common.by import By

    if url is not None:
        driver.get(url)
    deadline = time.monotonic() + PAGE_DEADLINE_S
    while True:
        text = driver.find_element(By.TAG_NAME, "body").text
        missing = [s for s in expect if s not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for close in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):
        if close.is_displayed():
            close.click()  # the MLflow Assistant side panel, which would hide a third of the page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    time.sleep(1.0)  # charts finish drawing after their labels appear
    driver.save_screenshot(str(ARTIFACTS / shot))
    assert not missing, f"{url} ({shot}) lacks {missing}; its text:\n{text[:3000]}"
    return text


def _final(client: MlflowClient, run_id: str, metric: str) -> float:
    return client.get_run(run_id).data.metrics[metric]


def test_the_mlflow_ui_shows_the_runs_their_stages_charts_and_their_comparison(two_runs, mlflow_ui, browser):
    from selenium.webdriver.common.by import By

    uri, (first, second) = two_runs
    client = MlflowClient(uri)
    experiment = first.experiment_id
    assert second.experiment_id == experiment
    sft = {r.run_id: next(s for s in r.stages if s.name == "sft").run_id for r in (first, second)}
    headline = "sft/eval/loss"  # the SFT stage's held-out loss, summarised on the parent run
    values = {r.mlflow_run_id: _final(client, r.mlflow_run_id, headline) for r in (first, second)}
    assert values[first.mlflow_run_id] != values[second.mlflow_run_id]  # two learning rates, two results

    # 1. The experiment list; the experiment's link leads to its page.
    _show(browser, f"{mlflow_ui}/#/experiments", "1-experiments.png", [NAME])
    # 2. The runs page `rlhf run` prints: both pipeline runs, named by their run ids, each with the
    # datasets its stages read (the SFT stage's training file) in the Dataset column.
    page = runs_page(mlflow_ui, experiment)
    _show(browser, page, "2-runs.png", ["Runs", first.run_id, second.run_id, "sft_train"])
    # A parent row expands (the button before its name) to its stages: the task and SFT child runs.
    browser.find_element(By.XPATH, f"//div[@role='row' and @row-id='{first.mlflow_run_id}']"
                                   "//div[@col-id='attributes.`Run Name`']//button").click()
    _show(browser, None, "2-runs-expanded.png", [first.run_id, "\ntask\n", "\nsft\n", "sft_train"])

    # 3. The parent run: its stages' headline metrics and its child runs.
    run_page = f"{mlflow_ui}/#/experiments/{experiment}/runs/{{}}{{}}?workflowType=machine_learning"
    _show(browser, run_page.format(first.mlflow_run_id, ""), "3-parent-run.png",
          [first.run_id, headline, "sft/eval/exact_match", "Child runs", "task", "sft"])

    # 4. The SFT stage's charts over steps; searched for "loss": the training and the held-out loss.
    _show(browser, run_page.format(sft[first.run_id], "/model-metrics"), "4-sft-metric-charts.png",
          ["exact_match", "loss", "Step"])
    browser.find_element(By.XPATH, "//input[@placeholder='Search metric charts']").send_keys("loss")
    _show(browser, None, "4-sft-loss-charts.png", ["sft (loss)", "sft (eval/loss)", "Step"])

    # 5. The two pipeline runs compared: the headline metric side by side.
    runs = quote(json.dumps([first.mlflow_run_id, second.mlflow_run_id]))
    text = _show(browser, f"{mlflow_ui}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment]))}"
                 "&workflowType=machine_learning",
                 "5-compare-runs.png", ["Comparing 2 Runs", first.run_id, second.run_id, headline])
    assert "stages.sft.optim.lr 0.001 0.0002" in text, text[:3000]  # the parameter that differs, side by side
