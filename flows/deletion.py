"""Prefect flow: unlearn the champion for every pending deletion request, register a candidate.

    python flows/deletion.py run     one run now (Prefect's ephemeral mode, no server needed)
    python flows/deletion.py serve   runs on the schedule of params.yaml `ops.schedule` (`make serve`)
    python flows/deletion.py deploy  the same schedule as a deployment on the work pool
                                     `ops.work_pool` of the server at PREFECT_API_URL

The work is in unlearnops.ops.deletion; each task here is one of its steps, with plain inputs
(a params path, request ids, a work folder) so Prefect never serialises a model. Tasks do not
cache: resuming after a crash is the library's job (see unlearnops/ops/deletion.py).
Run from the repository root: paths in params.yaml are relative to it.

A run holds the ledger's lease for its whole length (a second run is refused, exit 3), settles
its requests as failed on ANY error (exit 1 for an expected failure such as failed gates, 4 for
anything else), checks params.yaml before Prefect starts (exit 2, one line, no traceback) and
ties the temporary Prefect server it may start to its own life (it dies with the run, even on
kill -9). Every error is one line on stderr; exit codes: unlearnops/ops/errors.py.
"""
from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from unlearnops.ops import deletion, errors
from unlearnops.config import load_params
from unlearnops.ops.orchestration import bind_ephemeral_server, deploy, prefect_api, quiet_tracebacks
from unlearnops.params_schema import load_checked_params


@task(cache_policy=NO_CACHE)
def claim_requests(params_path: str) -> list[str]:
    return deletion.claim(load_params(params_path))


@task(cache_policy=NO_CACHE)
def plan_work(params_path: str, request_ids: list[str]) -> str:
    return str(deletion.plan(load_params(params_path), request_ids))


@task(cache_policy=NO_CACHE)
def unlearn_candidate(params_path: str, work_dir: str) -> str:
    return str(deletion.unlearn(load_params(params_path), work_dir))


@task(cache_policy=NO_CACHE)
def evaluate_candidate(params_path: str, work_dir: str) -> str:
    return str(deletion.evaluate(load_params(params_path), work_dir))


@task(cache_policy=NO_CACHE)
def register_candidate(params_path: str, work_dir: str) -> dict:
    return deletion.register(load_params(params_path), work_dir)


@task(cache_policy=NO_CACHE)
def settle_requests(params_path: str, request_ids: list[str], result: dict) -> dict:
    return deletion.settle(load_params(params_path), request_ids, result)


def checked_params(params_path: str) -> dict:
    """params.yaml, validated: a bad value fails here, before any request is touched (also an
    `ops.method` that names no registered method)."""
    params = load_checked_params(params_path)
    for key in ("method", "fallback_method"):
        if params["ops"][key] != "auto":
            deletion.methods.get_method(params["ops"][key], params)
    return params


@flow(name="deletion-requests")
def deletion_requests(params_path: str = "params.yaml") -> dict:
    """Pending requests -> one unlearned, gated, registered candidate (or failed requests)."""
    logger = get_run_logger()
    params = checked_params(params_path)
    with deletion.holding_lease(params):
        restored = deletion.restore_champion(params)  # the champion to unlearn from is the one the reviews approved
        if restored:
            logger.warning(restored)
        closed = deletion.close_dead_runs(params)
        if closed:
            logger.warning(f"marked the MLflow runs of dead deletion runs FAILED: {', '.join(closed)}")
        request_ids: list[str] = []
        try:
            request_ids = claim_requests(params_path)
            if not request_ids:
                logger.info("no pending deletion requests")
                return {"version": None, "unlearned": [], "failed": []}
            logger.info(f"unlearning for {len(request_ids)} requests: {', '.join(request_ids)}")
            work_dir = plan_work(params_path, request_ids)
            unlearn_candidate(params_path, work_dir)
            evaluate_candidate(params_path, work_dir)
            result = register_candidate(params_path, work_dir)
            create_markdown_artifact(deletion.review_markdown(params, work_dir, result), key="deletion-evidence",
                                     description="the candidate's evidence and gate verdicts, with its MLflow run")
            outcome = settle_requests(params_path, request_ids, result)
        except BaseException as err:
            # ANY failure settles the requests this run holds (one transaction, with the
            # error's class); only a kill -9 leaves them processing for the next run to resume.
            try:
                deletion.fail(params, request_ids, errors.one_line(err), type(err).__name__)
            except Exception as settle_err:  # the ledger itself is down: say so, keep the cause
                logger.error(f"could not settle the run's requests: {errors.one_line(settle_err)}")
            raise
    if result["version"] is None:  # loud: the flow run ends Failed with the reason (the requests say it too)
        raise deletion.GatesFailed(f"gates failed, no version registered ({len(outcome['failed'])} requests failed; "
                                   f"`unlearnops review list --failed`): {'; '.join(result['failed_gates'])}")
    logger.info(f"registered candidate v{result['version']}; review it with `unlearnops review list`")
    return outcome


def schedule(params: dict) -> dict:
    """flow.serve's schedule argument from params.yaml `ops.schedule`."""
    cfg = params["ops"]["schedule"]
    if cfg.get("cron"):
        return {"cron": str(cfg["cron"])}
    minutes = float(cfg["interval_minutes"])
    if minutes <= 0:
        raise ValueError(f"ops.schedule.interval_minutes must be > 0, got {minutes}")
    return {"interval": timedelta(minutes=minutes)}


def serve(params_path: str) -> None:
    """Serve the flow on its schedule, one run at a time.

    Prefect 3 does not schedule runs on its ephemeral API (the scheduler is a server service),
    so without PREFECT_API_URL this starts a private local server for as long as it serves.
    """
    when = schedule(load_params(params_path))
    with prefect_api():
        deletion_requests.serve(name="deletion-requests", parameters={"params_path": params_path}, limit=1, **when)


def deploy_to_pool(params_path: str) -> str:
    """A scheduled deployment on the work pool; one run at a time, like `serve`."""
    params = load_params(params_path)
    return deploy(deletion_requests, "flows/deletion.py:deletion_requests", "deletion-requests",
                  params["ops"]["work_pool"], parameters={"params_path": params_path}, concurrency_limit=1,
                  **schedule(params))


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the run's requests failed, 2 usage/params, 3 refused (another run
    holds the lease), 4 internal; errors are one line on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "serve", "deploy"])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params = checked_params(args.params)  # before Prefect: a config error is one line, no traceback
        if args.command == "serve":
            serve(args.params)
        elif args.command == "deploy":
            print(f"deployment {deploy_to_pool(args.params)}")
        else:
            bind_ephemeral_server()
            # SIGTERM (a stopped container, a cancelled job) becomes an exception, so the run
            # settles its requests and Prefect stops its server; kill -9 is left to the next run.
            signal.signal(signal.SIGTERM, _terminated)
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

            # Prefect's own 20 s for its temporary server is too short on a busy 2-core machine
            timeout = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: int(params["ops"]["prefect_startup_timeout_s"])}
            with quiet_tracebacks(), temporary_settings(updates=timeout):
                outcome = deletion_requests(args.params)
            print(outcome)
            return errors.NEGATIVE if outcome.get("failed") else errors.OK
    except deletion.FAILURES as err:
        print(f"failed: {errors.one_line(err)} (the run's requests are marked failed)", file=sys.stderr)
        return errors.NEGATIVE
    except BaseException as err:
        if isinstance(err, SystemExit):
            raise
        return errors.report(err)
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
