"""``rlhf``: validate, plan and run pipelines; submit them to a Ray cluster; render KubeRay manifests;
serve what they trained. Bad input exits 2 with a message, never a traceback."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

EXIT_USAGE = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _run_id(value: str) -> str:
    if not RUN_ID.match(value):
        raise argparse.ArgumentTypeError(f"{value!r}: a run id is letters, digits, '_', '.', '-' (at most 64)")
    return value


def _pipeline_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("pipeline", help="pipeline YAML file")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. stages.offline_dpo.schedule.steps=10 (repeatable)")


def _cluster_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://HOST:8265 (default: "
                     "$RAY_ADDRESS, else http://127.0.0.1:8265)")
    cmd.add_argument("--token-file", default=None, help="Ray auth token file, for clusters with token auth on "
                     "(or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Ray-native RLHF pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    _pipeline_args(sub.add_parser("validate", help="check a pipeline YAML and print its plan (exit 0 valid, "
                                  "2 invalid)"))
    _pipeline_args(sub.add_parser("plan", help="print the stage graph and resource plan"))
    sub.add_parser("kinds", help="list the stage kinds a pipeline can use: inputs, outputs and roles")
    for add in (_run_parser, _job_parsers, _cluster_parser, _k8s_parser, _serve_parser, _init_model_parser):
        add(sub)
    return parser


def _run_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run a pipeline: one MLflow parent run, one child run per stage")
    _pipeline_args(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars or plan printout")
    run.add_argument("--verbose", action="store_true", help="also show the actors' and libraries' output (vLLM, "
                     "DeepSpeed, transformers, Ray) on the console; it always goes to each stage's stage.log")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_ID",
                     help="continue an interrupted run (default: this pipeline's latest): completed stages with "
                     "unchanged config are skipped, the interrupted one continues from its last checkpoint, in "
                     "the same MLflow runs")
    run.add_argument("--run-id", type=_run_id, default=None, help="id of the new run (default: time + random)")
    run.add_argument("--mlflow-run-id", default=None, help="adopt this empty MLflow run as the parent run "
                     "(set by `rlhf submit`)")


def _job_parsers(sub: Any) -> None:
    submit = sub.add_parser("submit", help="submit a pipeline to a Ray cluster as a Ray job")
    _pipeline_args(submit)
    _cluster_args(submit)
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 "
                        "only if it succeeded")
    submit.add_argument("--working-dir", default=".", help="directory uploaded as the job's working_dir "
                        "(default: the current one)")
    submit.add_argument("--cluster-tracking-uri", default=None, metavar="URI",
                        help="the MLflow store as the cluster reaches it, when that differs from this machine's "
                        "URI (e.g. http://rayrlhf-mlflow:5000 behind a port-forward)")
    submit.add_argument("--resume", type=_run_id, default=None, metavar="RUN_ID",
                        help="resubmit an interrupted run (its run directory must be on the cluster's storage)")
    for name, help_text in (("status", "a submitted job's status and run ids"), ("logs", "a job's logs"),
                            ("stop", "stop a running job")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("job_id", help="submission id printed by `rlhf submit`")
        _cluster_args(cmd)
        if name == "logs":
            cmd.add_argument("--follow", action="store_true", help="keep streaming until the job ends")


def _cluster_parser(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="a Ray cluster of several nodes on this machine (tests, demos)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    for name, help_text in (("up", "start a head (no work) and worker nodes on 127.0.0.1, token auth on"),
                            ("status", "print the cluster's addresses, token file and nodes"),
                            ("restart", "start a lost or stopped worker node again (same CPUs and resource)"),
                            ("down", "stop the nodes `up` started (and nothing else)")):
        cmd = cluster_sub.add_parser(name, help=help_text)
        cmd.add_argument("--dir", default=".rlhf-cluster", help="where the cluster's record, token and logs live")
        if name == "up":
            cmd.add_argument("--workers", type=int, default=2, help="worker nodes: node_a, node_b, ...")
            cmd.add_argument("--cpus-per-worker", type=float, default=2)
        if name == "restart":
            cmd.add_argument("node", help="the worker node's name (node_a, node_b, ...)")


def _k8s_parser(sub: Any) -> None:
    k8s = sub.add_parser("k8s", help="KubeRay manifests").add_subparsers(dest="k8s_command", required=True)
    render = k8s.add_parser("render", help="print a ready RayJob (and its ConfigMap) for a pipeline")
    _pipeline_args(render)
    render.add_argument("--run-id", type=_run_id, default=None, help="pipeline run id (default: time + random)")
    render.add_argument("--image", default=None, help="container image (default: the one in k8s/raycluster.yaml)")
    render.add_argument("--namespace", default=None, help="metadata.namespace of the manifests")
    render.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    service = k8s.add_parser("render-service", help="print a RayService serving checkpoints on the runs volume")
    service.add_argument("policy", nargs="?", default=None, help="policy checkpoint path as the pods see it")
    service.add_argument("--reward-model", default=None, help="reward-model checkpoint path as the pods see it")
    service.add_argument("--name", default="rayrlhf-serve")
    service.add_argument("--image", default=None)
    service.add_argument("--namespace", default=None)
    service.add_argument("-o", "--output", default=None)
    check = k8s.add_parser("validate", help="check manifests against the KubeRay CRDs and operator rules")
    check.add_argument("files", nargs="+", help="manifest files (multi-document YAML)")


def _init_model_parser(sub: Any) -> None:
    from pipelines.tasks.architectures import ARCHITECTURES

    init = sub.add_parser("init-model", help="build a small random model of an architecture, with a BPE tokenizer "
                          "trained on your data files (try the product without a model hub)")
    init.add_argument("out", help="directory to write (HF format: config.json, model.safetensors, tokenizer)")
    init.add_argument("--architecture", default="llama", choices=sorted(ARCHITECTURES))
    init.add_argument("--size", default="tiny", choices=["tiny", "mini", "small", "85m"])
    init.add_argument("--positions", type=int, default=1024, help="max_position_embeddings")
    init.add_argument("--train-files", nargs="+", required=True, metavar="FILE",
                      help="data files whose texts train the tokenizer")
    init.add_argument("--vocab-size", type=int, default=4096)
    init.add_argument("--seed", type=int, default=0)


def _init_model(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from orchestrator.config import format_validation_error
    from pipelines.stages.init_model import InitModelStage, init_model

    try:
        stage = InitModelStage.model_validate({  # the stage's own checks of the same fields
            "name": "init", "kind": "init_model", "architecture": args.architecture, "size": args.size,
            "max_position_embeddings": args.positions, "seed": args.seed,
            "tokenizer": {"train_files": args.train_files, "vocab_size": args.vocab_size}})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None
    summary = init_model(args.out, architecture=stage.architecture, size=stage.size,
                         positions=stage.max_position_embeddings, train_files=stage.tokenizer.train_files,
                         vocab_size=stage.tokenizer.vocab_size, seed=stage.seed)
    tok = summary["tokenizer"]
    print(f"{args.out}: {summary['class']} ({summary['architecture']}, {summary['parameters']:,} parameters, "
          f"{summary['positions']} positions, tied embeddings: {'yes' if summary['tied_embeddings'] else 'no'}); "
          f"tokenizer: {tok['kind']}, {tok['vocab']} tokens, EOS {tok['eos']}, pad {tok['pad']}, ChatML template")
    return 0


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a trained checkpoint with Ray Serve on 127.0.0.1")
    serve.add_argument("checkpoint", help="policy checkpoint (HF directory, or a registered model: "
                       "models:/NAME@ALIAS, models:/NAME/VERSION) to serve for generation, or a reward to serve "
                       "for scoring: a reward-model checkpoint, a module:function, or a judge's YAML (the keys of "
                       "a stage's reward.judge)")
    serve.add_argument("--tracking-uri", default=None, help="the MLflow store models:/ URIs resolve in "
                       "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    serve.add_argument("--reward-model", default=None, help="also serve this reward-model checkpoint (or a "
                       "module:function reward) at /score")
    serve.add_argument("--reward-name", default="reward", help="the reward application's name: stages on the cluster "
                       "call it with reward: {served: NAME} (default: reward; another name serves at /NAME/score)")
    serve.add_argument("--reward-replicas", type=int, default=1, help="replicas of the reward application")
    serve.add_argument("--reward-cpus", type=float, default=0.5, help="CPUs of each reward replica")
    serve.add_argument("--reward-autoscale", default=None, metavar="MIN:MAX",
                       help="let Serve's autoscaler keep between MIN and MAX reward replicas (not a fixed count)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--engine", choices=("auto", "serve-llm", "vllm", "transformers"), default="auto",
                       help="generation engine (auto: ray.serve.llm where vLLM is installed)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        from orchestrator.console import error_message

        print(f"error: {error_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM during `rlhf run`: a line, not a traceback
        if getattr(args, "verbose", False):
            raise
        hint = f"; continue it with: rlhf run {args.pipeline} --resume" if args.command == "run" else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _load(args: argparse.Namespace):
    from orchestrator.config import load_pipeline

    return load_pipeline(args.pipeline, args.overrides)


def _cluster(args: argparse.Namespace) -> int:
    from deploy import local_cluster

    if args.cluster_command == "up":
        cluster = local_cluster.up(args.dir, workers=args.workers, cpus_per_worker=args.cpus_per_worker)
        print(local_cluster.describe(cluster))
    elif args.cluster_command == "status":
        print(local_cluster.describe(local_cluster.LocalCluster.load(args.dir)))
    elif args.cluster_command == "restart":
        print(local_cluster.describe(local_cluster.restart_node(args.dir, args.node)))
    else:
        print(f"stopped: {', '.join(local_cluster.down(args.dir)) or 'nothing was running'}")
    return 0


def _kinds(args: argparse.Namespace) -> int:
    from pipelines.stages.registry import KINDS

    for kind, entry in KINDS.items():
        model = entry.config
        print(f"{kind}: {(model.__doc__ or '').strip().splitlines()[0]}")
        inputs = ", ".join(f"{field} ({want})" for field, (want, _) in model.INPUTS.items())
        print(f"    inputs:  {inputs or '-'}")
        print(f"    outputs: {', '.join(f'{name} ({t})' for name, t in model.OUTPUTS.items()) or '-'}")
        print(f"    roles:   {', '.join(model.ROLES) or '-'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from orchestrator.plan import fit_to_machine, plan_pipeline
    from orchestrator.runtime.placement import format_plan
    from pipelines.stages.preflight import preflight_pipeline

    config = _load(args)
    # validate reads the data through and measures rows in tokens; plan only prints the plan
    lines = preflight_pipeline(config.stages, lengths=True) if args.command == "validate" else []
    config, fitted = fit_to_machine(config)
    print(f"{args.pipeline}: valid pipeline {config.name!r} with {len(config.stages)} stage(s)")
    print("\n".join(lines + fitted + [format_plan(plan_pipeline(config))]))
    return 0


def _interrupt_on_sigterm() -> None:
    """`rlhf stop` / `ray job stop` send SIGTERM: unwind like Ctrl-C, so the runs are closed as KILLED
    and the last checkpoint stays the last good one (``runner.init_ray`` installs it again over the
    C-level handler Ray's core worker sets)."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _run(args: argparse.Namespace) -> int:
    if args.resume is not None and args.run_id:
        raise UserError("--resume and --run-id exclude each other (the resumed run keeps its id)")
    from orchestrator.report import print_summary
    from orchestrator.runner import run_pipeline

    config = _load(args)
    _interrupt_on_sigterm()
    try:
        result = run_pipeline(config, quiet=args.quiet, resume=args.resume, run_id=args.run_id,
                              mlflow_run_id=args.mlflow_run_id, verbose=args.verbose)
    except Exception as exc:
        if args.verbose or not getattr(exc, "rlhf_reported", False):
            raise
        # The stage's failure, its log and the log's tail are printed; the traceback is in the log.
        print(f"the run stopped; once the cause is fixed, continue it with: rlhf run {args.pipeline} --resume",
              file=sys.stderr)
        return EXIT_JOB_FAILED
    print_summary(result)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from deploy import jobs

    config = _load(args)
    working_dir = Path(args.working_dir)
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    spec = jobs.submit(config, address=args.address, working_dir=working_dir, resume_run_id=args.resume,
                       token_file=args.token_file, cluster_tracking_uri=args.cluster_tracking_uri)
    print(f"submitted job {spec.submission_id} (pipeline run {spec.run_id})")
    for key in ("mlflow.tracking_uri", "mlflow.experiment_id", "mlflow.run_id"):
        if key in spec.metadata:
            print(f"  {key}: {spec.metadata[key]}")
    if not args.follow:
        print(f"  follow it:  rlhf logs {spec.submission_id} --follow"
              + (f" --address {args.address}" if args.address else ""))
        return 0
    status = jobs.follow(jobs.client(args.address, args.token_file), spec.submission_id)
    print(f"job {spec.submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else EXIT_JOB_FAILED


def _job_command(args: argparse.Namespace) -> int:
    from deploy import jobs

    client = jobs.client(args.address, args.token_file)
    if args.command == "status":
        print(jobs.describe(client, args.job_id))
    elif args.command == "stop":
        stopped = jobs.call(f"job {args.job_id}", client.stop_job, args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'not running'}")
    elif args.follow:
        status = jobs.follow(client, args.job_id)
        return 0 if status == "SUCCEEDED" else EXIT_JOB_FAILED
    else:
        sys.stdout.write(jobs.call(f"job {args.job_id}", client.get_job_logs, args.job_id))
    return 0


def _k8s(args: argparse.Namespace) -> int:
    import yaml

    from deploy import k8s, k8s_checks

    if args.k8s_command == "validate":
        problems = k8s_checks.check_files([Path(f) for f in args.files])
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            return EXIT_USAGE
        print(f"{len(args.files)} file(s): valid")
        return 0
    if args.k8s_command == "render":
        text = k8s.render_pipeline_job(_load(args), pipeline_path=args.pipeline, run_id=args.run_id,
                                       image=args.image, namespace=args.namespace)
    else:
        text = k8s.render_service(args.policy, reward_model=args.reward_model, name=args.name, image=args.image,
                                  namespace=args.namespace)
    problems = [p for doc in yaml.safe_load_all(text) for p in k8s_checks.operator_problems(doc)]
    if problems:  # e.g. an --image whose Ray version differs from rayVersion
        raise UserError("the rendered manifest would be rejected or misbehave:\n  " + "\n  ".join(problems))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; apply it with: kubectl apply -f {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from deploy.serve_app import serve_forever
    from orchestrator.lineage import resolve_model_uri
    from orchestrator.runtime.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    checkpoint = resolve_model_uri(args.checkpoint, uri)
    reward_model = resolve_model_uri(args.reward_model, uri) if args.reward_model else None
    autoscale = None
    if args.reward_autoscale:
        low, _, high = args.reward_autoscale.partition(":")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
            raise UserError(f"--reward-autoscale: give MIN:MAX with 0 < MIN <= MAX, got {args.reward_autoscale!r}")
        autoscale = (int(low), int(high))
    serve_forever(checkpoint, reward_model=reward_model, host=args.host, port=args.port, engine=args.engine,
                  reward_name=args.reward_name, reward_replicas=args.reward_replicas, reward_autoscale=autoscale,
                  reward_cpus=args.reward_cpus)
    return 0


_COMMANDS = {"validate": _validate, "plan": _validate, "kinds": _kinds, "cluster": _cluster, "run": _run,
             "submit": _submit, "status": _job_command, "logs": _job_command, "stop": _job_command, "k8s": _k8s,
             "serve": _serve, "init-model": _init_model}


if __name__ == "__main__":
    sys.exit(main())
