"""`unlearnops review list|approve|reject`: the registry review's command-line views.

Each command returns its exit code (unlearnops/ops/errors.py): 0 on success, 2 for bad input
(a blank reviewer or reason), 3 when the action is refused (not the pending candidate, decided
already, by another reviewer too); the reason is one line on stderr and nothing was changed.
"""
from __future__ import annotations

from datetime import datetime, timezone

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from unlearnops.ops import errors, model_registry
from unlearnops.ops.ledger import Ledger, LedgerError, time_left

MODELS = ("candidate", "champion", "retrain")
METRICS = ("forget_accuracy", "retain_accuracy", "test_accuracy", "loss_auc", "mia_auc", "mia_accuracy")


def _evidence_table(version, run_metrics: dict) -> Table:
    """The version's metrics side by side, from its MLflow run (logged as <model>.<metric>)."""
    table = Table(title=f"v{version.version}: metrics on this run's forget set", title_justify="left")
    table.add_column("metric")
    for model in MODELS:
        table.add_column(model if model != "retrain" else "retrained", justify="right")
    for metric in METRICS:
        values = [run_metrics.get(f"{model}.{metric}") for model in MODELS]
        table.add_row(metric, *["-" if v is None else f"{v:.4f}" for v in values])
    return table


def _links(run, params: dict, version) -> list[tuple[str, str]]:
    ui = str(params["ops"]["ui_url"]).rstrip("/")
    return [
        ("MLflow run", f"{ui}/#/experiments/{run.info.experiment_id}/runs/{version.run_id}"),
        ("report", f"{run.info.artifact_uri}/review/report.md"),
        ("model", f"models:/{version.name}/{version.version} (ONNX; weights in {model_registry.STACK_PATH})"),
    ]


def _deadline(ledger: Ledger | None, version) -> str:
    """The earliest due date of the version's requests and the time left to it."""
    if ledger is None:
        return "?"
    due = []
    for request_id in model_registry.request_ids_of(version):
        try:
            due.append(ledger.get(request_id).due_at)
        except LedgerError:
            continue
    due = [d for d in due if d is not None]
    return f"{min(due):%Y-%m-%d %H:%M} UTC ({time_left(min(due))})" if due else "?"


def cmd_list(mlflow_client, params: dict, include_decided: bool = False, ledger: Ledger | None = None) -> int:
    console = Console()
    name = model_registry.model_name(params)
    restored = None if ledger is None else model_registry.restore_champion(mlflow_client, ledger, name)
    if restored:
        console.print(f"[bold red]warning:[/bold red] {escape(restored)}", highlight=False)
    champion = model_registry.get_alias(mlflow_client, name, model_registry.CHAMPION)
    console.print(f"registered model [bold]{escape(name)}[/bold]; champion: "
                  + (f"v{champion.version} ({champion.tags.get('unlearnops.role', '?')})" if champion else "none"),
                  highlight=False)
    found = model_registry.candidates(mlflow_client, name, include_decided)
    if not found:
        console.print("no candidates awaiting review" if not include_decided else "no candidates", highlight=False)
        return 0
    for version in found:
        tags = version.tags
        run = mlflow_client.get_run(version.run_id)
        status = tags.get("review_status", "?")
        aliases = f" [{', '.join(version.aliases)}]" if version.aliases else ""
        console.rule(escape(f"v{version.version}{aliases}: {status}"), align="left")
        facts = Table(show_header=False, box=None)
        for label, value in [
            ("requests", f"{tags.get('request_ids', '').replace(',', ', ')} ({tags.get('n_forget_samples', '?')} samples)"),
            ("first due", _deadline(ledger, version)),
            ("method", f"{tags.get('method')} ({tags.get('method_reason')}); "
                       f"{tags.get('unlearn_seconds', '?')} s to unlearn"),
            ("unlearned from", f"champion v{tags.get('base_version')}"),
            ("provenance", f"data {tags.get('data_hash')}, code {tags.get('code_version')}, work {tags.get('work_key')}"),
            ("ONNX parity", f"max |logit diff| {tags.get('onnx.max_abs_logit_diff')}, "
                            f"top-1 agreement {tags.get('onnx.top1_agreement')}"),
            *[(f"gate {k.removeprefix('gate.')}", v) for k, v in sorted(tags.items()) if k.startswith("gate.")],
            *[(k.replace("_", " "), tags[k]) for k in ("superseded_by", "reviewed_by", "reviewed_at", "review_reason")
              if tags.get(k)],
            *_links(run, params, version),
        ]:
            facts.add_row(label, escape(str(value)))
        console.print(facts)
        console.print(_evidence_table(version, run.data.metrics))
    return 0


def cmd_failed(mlflow_client, params: dict, limit: int = 20) -> int:
    """The latest deletion runs whose candidate failed a gate (nothing was registered): when, which
    requests, the method, the gates that failed, and the MLflow run with the evidence."""
    console = Console()
    runs = model_registry.deletion_runs(mlflow_client, params, "tags.gates = 'failed'",
                                        max_results=limit, order_by=["attributes.start_time DESC"])
    if not runs:
        console.print("no deletion runs with failed gates", highlight=False)
        return 0
    ui = str(params["ops"]["ui_url"]).rstrip("/")
    table = Table("started", "requests", "method", "failed gates", "MLflow run")
    for run in runs:
        tags = run.data.tags
        started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        table.add_row(started, escape(tags.get("request_ids", "?").replace(",", ", ")), escape(tags.get("method", "?")),
                      escape(tags.get("failed_gates", "?")), f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    console.print(table)
    return 0


def _refused(err: Exception) -> int:
    return errors.report(err)


def cmd_approve(mlflow_client, ledger: Ledger, params: dict, version: str, reviewer: str, reason: str | None) -> int:
    try:
        approved = model_registry.approve(mlflow_client, ledger, params, version, reviewer, reason)
    except (model_registry.RegistryError, LedgerError) as err:
        return _refused(err)
    requests = model_registry.request_ids_of(approved)
    Console().print(f"v{approved.version} is now the {model_registry.CHAMPION}; requests {', '.join(requests)} approved and "
                    f"their samples added to the deletion list {params['data']['deleted']} "
                    "(`dvc repro` retrains and benchmarks without them)", highlight=False)
    return 0


def cmd_reject(mlflow_client, ledger: Ledger, params: dict, version: str, reviewer: str, reason: str,
               reject_requests: bool) -> int:
    try:
        rejected = model_registry.reject(mlflow_client, ledger, params, version, reviewer, reason, reject_requests)
    except (model_registry.RegistryError, LedgerError) as err:
        return _refused(err)
    outcome = ("rejected" if reject_requests else
               "failed (change ops.method or its hyperparameters, then `unlearnops request retry`)")
    Console().print(f"v{rejected.version} rejected; its requests {', '.join(model_registry.request_ids_of(rejected))} "
                    f"are {outcome}", highlight=False)
    return 0
