"""`unlearnops ...`: the command line. Each command is a thin call into the library.

Commands that do not train answer in about a second: this module imports only the standard library
and yaml, and each command imports what it uses (the ledger commands never load torch, MLflow or
scikit-learn; `review list` loads MLflow, not torch or ONNX). tests/test_cli_startup.py keeps it so.

Exit codes (unlearnops/ops/errors.py): 0 ok; 1 done with a negative outcome (a submitted request
was rejected); 2 usage (bad arguments, params.yaml, input files); 3 refused (the ledger's or the
registry's state does not allow it); 4 internal error. Every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from unlearnops.config import load_params
from unlearnops.ops.errors import OneLineParser



def load_checked(path: str) -> dict:
    """params.yaml, validated against the schema (one ConfigError naming every bad key)."""
    from unlearnops.params_schema import load_checked_params

    return load_checked_params(path)


def cmd_repro(args) -> int:
    """`dvc repro` inside one parent MLflow run that every stage's run nests under; the stages
    spool their runs and they are logged at the end (tracking.replay), also when a stage failed."""
    import tempfile

    from unlearnops import tracking, validate

    params = load_params(args.params)
    problems = validate.problems(params)  # before any stage runs: a typo fails now, not after minutes of work
    if problems:
        for problem in problems:
            print(f"error: {args.params}: {problem}", file=sys.stderr)
        return 2
    mlflow = tracking.configure(params)
    run = mlflow.start_run(run_name="pipeline", tags={"unlearnops.stage": "pipeline"})
    code = 1
    try:
        with tempfile.TemporaryDirectory(prefix="unlearnops-spool-") as spool:
            env = {**os.environ, tracking.PARENT_ENV: run.info.run_id, tracking.SPOOL_ENV: spool}
            code = subprocess.call(["dvc", "repro", *args.dvc_args], env=env)
            tracking.replay(params, spool, run.info.run_id)
            mlflow.set_tag("dvc_exit_code", code)
    finally:  # a failed stage (dvc's exit code, or a spooled run that failed) fails the pipeline run
        failed = code != 0 or mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
    return code


def cmd_methods(args) -> int:
    from unlearnops import methods

    print("\n".join(methods.available()))
    return 0


def cmd_score(args) -> int:
    from unlearnops.metrics.epsilon import score_files

    result = score_files(args.unlearned, args.retrained, args.out, labels_path=args.labels, logits=args.logits)
    print(f"forget quality F = {result['forget_quality']:.4f} over {result['n_examples']} examples, {result['n_models']} models -> {args.out}")
    return 0


def cmd_tune(args) -> int:
    from unlearnops import tune

    params = load_checked(args.params)
    summary = tune.tune(params, args.method, n_trials=args.trials, params_path=args.params, apply=args.apply)
    where = tune.TUNE / summary["setting"]
    best = summary["best"]
    shown = {k: "-" if summary[k] is None else f"{summary[k]['value']:.4f}" for k in ("defaults", "best")}
    print(f"{args.method} on {summary['setting']}: {summary['n_finished']} trials ({summary['n_pruned']} pruned, "
          f"{summary['n_complete'] - summary['n_feasible']} over the time budget), {summary['seconds_per_trial'] or 0:.1f} s per trial; "
          f"Final on the validation side ({summary['n_models']} models): defaults {shown['defaults']}, best {shown['best']}")
    if best is None:
        print("no feasible trial: nothing to apply", file=sys.stderr)
        return 1
    print(f"best params: {best['params']} -> {where / (args.method + '.yaml')}; summary -> {where / (args.method + '.json')}")
    if args.apply:
        print(f"written into {args.params}: {', '.join(summary['applied'])}")
    else:
        print(f"to use them: unlearnops tune {args.method} --apply (writes {args.params}), or {tune.dvc_exp_command(args.method, best['params'])}")
    return 0


def _ids(values: list[str] | None) -> list[str] | None:
    """Ids given as `1 2 3`, `1,2,3` or both."""
    return None if values is None else [part for value in values for part in value.split(",") if part.strip()]


def cmd_request(args) -> int:
    from unlearnops.layout import samples_table
    from unlearnops.ops import ledger_cli
    from unlearnops.ops.ledger import open_ledger

    params = load_checked(args.params)
    ledger = open_ledger(params)
    if args.action == "submit":
        return ledger_cli.cmd_submit(ledger, samples_table(params), _ids(args.user_ids), _ids(args.sample_ids),
                                     args.file, reason=args.reason, actor=args.actor, deleted=params["data"]["deleted"])
    if args.action == "list":
        return ledger_cli.cmd_list(ledger, args.status, args.overdue)
    if args.action == "show":
        return ledger_cli.cmd_show(ledger, args.request_id)
    return ledger_cli.cmd_retry(ledger, args.request_ids, actor=args.actor)


def cmd_review(args) -> int:
    from unlearnops.ops import model_registry, review_cli
    from unlearnops.ops.ledger import open_ledger

    params = load_checked(args.params)
    mlflow_client = model_registry.client(params)
    ledger = open_ledger(params)
    if args.action == "list" and args.failed:
        return review_cli.cmd_failed(mlflow_client, params)
    if args.action == "list":
        return review_cli.cmd_list(mlflow_client, params, args.all, ledger)
    if args.action == "approve":
        return review_cli.cmd_approve(mlflow_client, ledger, params, args.version, args.reviewer, args.reason)
    return review_cli.cmd_reject(mlflow_client, ledger, params, args.version, args.reviewer, args.reason,
                                 args.reject_requests)


def _add_request_commands(sub) -> None:
    request = sub.add_parser("request", help="deletion requests: submit, list, show, retry")
    actions = request.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="submit a deletion request (ids, or a CSV/JSON file)")
    submit.add_argument("--user-ids", nargs="+", metavar="ID", help="users whose training samples to delete")
    submit.add_argument("--sample-ids", nargs="+", metavar="ID", help="training samples to delete")
    submit.add_argument("--file", help="CSV (user_id and/or sample_id columns) or JSON request file")
    submit.add_argument("--reason", help="why the requester wants the deletion")
    submit.add_argument("--actor", help="who submits it (recorded in the audit trail)")
    listing = actions.add_parser("list", help="list requests")
    listing.add_argument("--status", help="only requests with this status")
    listing.add_argument("--overdue", action="store_true",
                         help="only open requests (not yet deleted or rejected) past their due date")
    actions.add_parser("show", help="one request and its history").add_argument("request_id")
    retry = actions.add_parser("retry", help="queue failed requests for the next deletion run (all ids or none)")
    retry.add_argument("request_ids", nargs="+", metavar="ID")
    retry.add_argument("--actor", help="who asks for the retry")
    request.set_defaults(func=cmd_request)


def _add_review_commands(sub) -> None:
    review = sub.add_parser("review", help="review unlearned candidates in the MLflow registry")
    actions = review.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="candidates awaiting review, with their evidence")
    listing.add_argument("--all", action="store_true", help="also approved, rejected and superseded ones")
    listing.add_argument("--failed", action="store_true", help="instead: the latest deletion runs whose candidate failed a gate")
    approve = actions.add_parser("approve", help="make a candidate the champion; its requests are deleted")
    approve.add_argument("version")
    approve.add_argument("--reviewer", required=True)
    approve.add_argument("--reason")
    reject = actions.add_parser("reject", help="turn a candidate down; its requests fail (or are rejected)")
    reject.add_argument("version")
    reject.add_argument("--reviewer", required=True)
    reject.add_argument("--reason", required=True)
    reject.add_argument("--reject-requests", action="store_true",
                        help="reject the requests themselves (default: they fail and can be retried)")
    review.set_defaults(func=cmd_review)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="unlearnops", description="Machine unlearning benchmark and operations.",
        epilog="exit codes: 0 ok; 1 done, negative outcome (a request rejected); 2 usage (arguments, params.yaml, "
               "input files); 3 refused (ledger/registry state, e.g. already decided); 4 internal error. "
               "Errors are one line on stderr.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    repro = sub.add_parser("repro", help="run `dvc repro` under one parent MLflow run")
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to dvc repro")
    repro.set_defaults(func=cmd_repro)

    sub.add_parser("methods", help="list the registered unlearning methods").set_defaults(func=cmd_methods)

    score = sub.add_parser("score", help="the NeurIPS 2023 competition's epsilon score of saved arrays")
    score.add_argument("--unlearned", required=True, help=".npy [N_models, N_examples] logit-scaled confidences (or logits with --logits)")
    score.add_argument("--retrained", required=True, help=".npy of the same shape, from models retrained without the forget set")
    score.add_argument("--out", required=True, help="JSON to write: epsilons (one per example), forget_quality, bins")
    score.add_argument("--logits", action="store_true", help="inputs are [N_models, N_examples, C] logits; needs --labels")
    score.add_argument("--labels", help=".npy [N_examples] integer labels (with --logits)")
    score.set_defaults(func=cmd_score)
    tune = sub.add_parser("tune", help="search a method's hyperparameters with Optuna (validation side; resumable)")
    tune.add_argument("method", help="the method (`unlearnops methods`); its space: params.yaml tune.spaces.<method>")
    tune.add_argument("--trials", type=int, metavar="N", help="finished trials in all (default: tune.n_trials); a rerun resumes")
    tune.add_argument("--apply", action="store_true", help="write the best params into params.yaml (comments kept)")
    tune.set_defaults(func=cmd_tune)
    _add_request_commands(sub)
    _add_review_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from unlearnops.ops import errors

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # every error: one line on stderr, its exit code
        return errors.report(err)


if __name__ == "__main__":
    sys.exit(main())
