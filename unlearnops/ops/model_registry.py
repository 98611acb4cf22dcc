"""The MLflow model registry: the model in production, candidates for review, the decision.

One registered model (params.yaml `ops.model_name`) with two aliases:
- `champion`: the model in production. The first is the target model, registered by the
  train_target stage when the registered model has no champion yet.
- `candidate`: the newest unlearned version awaiting review (flows/deletion.py registers it).

Every version is an MLflow ONNX model (what a server loads) carrying the ModelStack file as
an extra file (`extra_files/models.pt`: the weights further unlearning starts from, read with
torch.load(weights_only=True); an MLflow pytorch model is a pickle and is never loaded).
Its tags carry the evidence a reviewer needs: request ids, method, metrics against the
champion and a retrained reference, gate verdicts, ONNX parity, data hash, code version.

Review: `approve` moves `champion` to the version, records reviewer, time and reason as
version tags, marks its deletion requests `approved` and appends their samples to the
deletion list, so the next `prepare` drops them. `reject` records why and sends the requests
to `failed` (the request stays valid; the model did not do): an operator changes the method or
its hyperparameters and runs `unlearnops request retry`. `reject_requests=True` rejects the
requests themselves instead (for a request that should never have been accepted).
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from unlearnops import tracking
from unlearnops.config import ConfigError
from unlearnops.ops.ledger import Ledger, Refused, Status, apply_approved, open_ledger

if TYPE_CHECKING:  # torch and ONNX load in the functions that use them: `review list` needs neither
    import torch

    from unlearnops.stack import ModelStack

CHAMPION = "champion"
ROLE = "unlearnops.role"
CANDIDATE = "candidate"
STACK_PATH = "extra_files/models.pt"  # where mlflow.onnx.log_model puts extra_files
ONNX_REQUIREMENTS = ["onnx==1.23.2", "onnxruntime==1.31.1"]
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Values of the `review_status` tag of a candidate.
PENDING, APPROVED, REJECTED, SUPERSEDED = "pending", "approved", "rejected", "superseded"


class RegistryError(ValueError):
    """A review action that the registry's state refuses (nothing was changed)."""


class UnknownVersion(RegistryError):
    """A version number that the registered model does not have (bad input)."""


def client(params: dict):
    """An MlflowClient on the tracking store of params (MLFLOW_TRACKING_URI wins)."""
    tracking.configure(params)
    from mlflow import MlflowClient

    return MlflowClient()


def deletion_runs(mlflow_client, params: dict, condition: str, **search) -> list:
    """The deletion flow's MLflow runs in params' experiment matching `condition` (an MLflow
    filter, ANDed to the deletion-stage tag); none if the experiment does not exist yet."""
    experiment = mlflow_client.get_experiment_by_name(params["mlflow"]["experiment"])
    if experiment is None:
        return []
    return mlflow_client.search_runs([experiment.experiment_id], f"tags.`unlearnops.stage` = 'deletion' and {condition}", **search)


# Registered model names this module accepts: no quote, backtick or backslash can reach a filter.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,199}")


def model_name(params: dict) -> str:
    return check_name(str(params["ops"]["model_name"]))


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"ops.model_name {name!r} is not a safe registered model name "
                            "(letters, digits, space, _ . -; at most 200)")
    return name


def quote(value: str) -> str:
    """`value` as a quoted literal of an MLflow filter string. MLflow's filter grammar has no
    escape for quotes, so a value that holds one is refused rather than spliced in."""
    value = str(value)
    if any(c in value for c in "'\"\\`") or any(ord(c) < 32 for c in value):
        raise RegistryError(f"{value!r} cannot be used in a registry filter (quote, backslash or control character)")
    return f"'{value}'"


# ------------------------------------------------------------------ provenance


def data_hash(paths: list[str | Path]) -> str:
    """sha256 over the files that exist among `paths` (name and bytes), first 16 hex digits."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def code_version() -> str:
    """The git commit of the unlearnops checkout, with '-dirty' if it has local changes."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ------------------------------------------------------------------ versions


def get_alias(mlflow_client, name: str, alias: str):
    """The version holding `alias`, or None (also when the registered model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def get_version(mlflow_client, name: str, version: int | str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise UnknownVersion(f"registered model '{name}' has no version {version!r}") from None


def versions(mlflow_client, name: str, **tags: str) -> list:
    """Versions of `name` whose tags have these values, newest first."""
    # Only the name goes into the filter (quoted, checked); tags are compared here, so no tag
    # value can change the query.
    found = mlflow_client.search_model_versions(f"name={quote(check_name(name))}")
    numbers = sorted((int(v.version) for v in found
                      if all(v.tags.get(k) == str(value) for k, value in tags.items())), reverse=True)
    return [get_version(mlflow_client, name, n) for n in numbers]  # search results carry no aliases


def load_stack(mlflow_client, name: str, version: int | str) -> ModelStack:
    """The weights of a registered version, as a ModelStack of one model."""
    import mlflow

    from unlearnops.stack import ModelStack

    get_version(mlflow_client, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/{STACK_PATH}", dst_path=tmp)
        return ModelStack.load(path)


def log_model_files(mlflow, stack: ModelStack, test_x: torch.Tensor, params: dict):
    """Inside an active run: export model 0 of `stack` to ONNX, check parity on `test_x`, log
    the ONNX model with the stack file as an extra file. Returns (model info, parity)."""
    import onnx
    import torch
    from mlflow.models import infer_signature

    from unlearnops.ops.export import OnnxConfig, export_checked

    cfg = OnnxConfig.from_params(params)
    example = test_x[:2]
    with torch.no_grad():  # the signature: an image batch in, one logit per class out
        signature = infer_signature(example.numpy(), stack.module(0).eval()(example).float().numpy())
    with tempfile.TemporaryDirectory() as tmp:
        stack_path = Path(tmp) / "models.pt"
        stack.select([0]).save(stack_path)
        result = export_checked(stack.module(0), test_x, Path(tmp) / "model.onnx", cfg)
        mlflow.log_metrics({f"onnx.{k}": v for k, v in result.items()})
        info = mlflow.onnx.log_model(onnx.load(str(Path(tmp) / "model.onnx")), name="onnx",
                                     extra_files=[str(stack_path)], pip_requirements=ONNX_REQUIREMENTS,
                                     input_example=example.numpy(), signature=signature)
    return info, result


def move_alias(mlflow_client, name: str, alias: str, version: str | int | None, ledger: Ledger | None = None,
               actor: str | None = None, note: str | None = None) -> None:
    """Point `alias` at `version` (None: remove it) and append the move to the ledger."""
    current = get_alias(mlflow_client, name, alias)
    previous = None if current is None else str(current.version)
    new = None if version is None else str(version)
    if previous == new:
        return
    if ledger is not None:
        ledger.record_alias(name, alias, new, previous, actor=actor, note=note)
    if new is None:
        mlflow_client.delete_registered_model_alias(name, alias)
    else:
        mlflow_client.set_registered_model_alias(name, alias, new)


def register(mlflow_client, name: str, model_info, run_id: str, tags: dict, alias: str,
             ledger: Ledger | None = None, actor: str | None = None):
    """A new version of `name` from a logged model, with tags, holding `alias`."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow_client.create_model_version(name, source=model_info.model_uri, run_id=run_id,
                                                 tags={k: str(v) for k, v in tags.items()},
                                                 model_id=model_info.model_id)
    move_alias(mlflow_client, name, alias, version.version, ledger, actor, note=f"registered v{version.version}")
    return get_version(mlflow_client, name, version.version)


def register_first_champion(mlflow, run, params: dict, stack: ModelStack, test_x: torch.Tensor,
                            metrics: dict, data_files: list[Path]):
    """In the target's run: register it as `champion` if the registered model has none yet."""
    mlflow_client = client(params)
    name = model_name(params)
    current = get_alias(mlflow_client, name, CHAMPION)
    if current is not None:
        print(f"registry: '{name}' already has champion v{current.version}; the target is not registered")
        return None
    info, parity = log_model_files(mlflow, stack, test_x, params)
    tags = {"unlearnops.role": "target", "code_version": code_version(), "data_hash": data_hash(data_files),
            **{f"metric.target.{k}": f"{v:.4f}" for k, v in metrics.items()},
            **{f"onnx.{k}": f"{v:.6g}" for k, v in parity.items()}}
    try:  # the alias history lives in the ledger; a benchmark without one still registers
        ledger = open_ledger(params)
    except Exception as err:  # noqa: BLE001
        print(f"registry: no ledger to record the alias move in ({type(err).__name__}: {err})")
        ledger = None
    version = register(mlflow_client, name, info, run.info.run_id, tags, CHAMPION, ledger, "train_target")
    print(f"registry: registered the target as '{name}' v{version.version} (alias {CHAMPION})")
    return version


def pending_candidate(mlflow_client, name: str):
    """The version holding `candidate` if it still awaits review, else None."""
    version = get_alias(mlflow_client, name, CANDIDATE)
    return version if version is not None and version.tags.get("review_status") == PENDING else None


def candidates(mlflow_client, name: str, include_decided: bool = False) -> list:
    """Unlearned versions (those with a review status), newest first: those awaiting review, or all."""
    found = [v for v in versions(mlflow_client, name) if "review_status" in v.tags]
    return found if include_decided else [v for v in found if v.tags.get("review_status") == PENDING]


def set_role(mlflow_client, name: str, version, role: str) -> None:
    """`unlearnops.role` says what a version is now: target, candidate, champion, former champion,
    rejected or superseded (review_status keeps the review's own outcome)."""
    mlflow_client.set_model_version_tag(name, str(version), ROLE, role)


def restore_champion(mlflow_client, ledger: Ledger, name: str) -> str | None:
    """If `champion` points elsewhere than the ledger's last recorded move (the alias was moved
    outside the review, e.g. with the MLflow UI's pencil), move it back and record that; returns
    what was found, or None when the two agree (or the ledger has no champion move yet)."""
    moves = [e for e in ledger.alias_history(name) if e.alias == CHAMPION]
    if not moves:
        return None
    approved = moves[-1].version
    current = get_alias(mlflow_client, name, CHAMPION)
    found = None if current is None else str(current.version)
    if found == approved:
        return None
    move_alias(mlflow_client, name, CHAMPION, approved, ledger, actor="unlearnops",
               note=f"restored: moved to v{found} outside the review")
    return (f"the '{CHAMPION}' alias of '{name}' pointed at v{found}, not at v{approved} as the ledger's reviews say: "
            f"it was moved outside the review and is restored to v{approved}")


def request_ids_of(version) -> list[str]:
    return [r for r in version.tags.get("request_ids", "").split(",") if r]


# ------------------------------------------------------------------ review


def _reviewable(mlflow_client, name: str, number: int | str):
    """A candidate a reviewer may decide on; RegistryError naming why not otherwise."""
    version = get_version(mlflow_client, name, number)
    tags = version.tags
    if "review_status" not in tags:  # not an unlearned version (the target, say)
        raise RegistryError(f"v{version.version} of '{name}' is not an unlearned candidate "
                            f"(role: {tags.get(ROLE, 'none')})")
    if tags.get("gates") != "passed":
        failed = [f"{k}: {v}" for k, v in sorted(tags.items()) if k.startswith("gate.") and v.startswith("fail")]
        raise RegistryError(f"v{version.version}: its gates did not pass ({'; '.join(failed) or 'no gate verdicts'}); "
                            "it cannot be approved")
    status = tags.get("review_status")
    if status != PENDING:
        raise RegistryError(f"v{version.version} is not awaiting review (review_status: {status})")
    return version


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _check_reviewer(reviewer: str | None) -> str:
    if reviewer is None or not str(reviewer).strip():
        raise ConfigError("a reviewer name is required (non-blank)")
    return str(reviewer).strip()


def _finish_review(mlflow_client, ledger: Ledger, params: dict, name: str, version, review) -> object:
    """MLflow's side of a decision the ledger recorded: aliases and tags, from the ledger's
    record (so both always name the same reviewer). Every write can be repeated, so an
    interrupted decision is finished by running the command again."""
    number = str(version.version)
    if review.decision == APPROVED:
        apply_approved(ledger, params["data"]["deleted"], review.request_ids, review.at)
        previous = get_alias(mlflow_client, name, CHAMPION)
        if previous is None or str(previous.version) != number:
            mlflow_client.set_registered_model_alias(name, CHAMPION, number)
            if previous is not None:
                set_role(mlflow_client, name, previous.version, "former champion")
    set_role(mlflow_client, name, number, "champion" if review.decision == APPROVED else "rejected")
    candidate = get_alias(mlflow_client, name, CANDIDATE)
    for key, value in {"reviewed_by": review.reviewer, "reviewed_at": review.at.isoformat(timespec="seconds"),
                       "review_reason": review.reason or "", "review_status": review.decision}.items():
        mlflow_client.set_model_version_tag(name, number, key, value)
    if candidate is not None and str(candidate.version) == number:
        mlflow_client.delete_registered_model_alias(name, CANDIDATE)
    return get_version(mlflow_client, name, number)


def _decide(mlflow_client, ledger: Ledger, params: dict, number, reviewer: str, reason: str | None,
            decision: str, moves, approving: bool):
    """Compare-and-set in the ledger first (the version must still be the pending candidate and
    not yet decided), MLflow second; a decision already recorded is finished, not redone."""
    reviewer = _check_reviewer(reviewer)
    name = model_name(params)
    version = get_version(mlflow_client, name, number)
    earlier = ledger.review(name, str(version.version))
    if earlier is not None:  # decided: finish MLflow's side, then tell the caller
        if version.tags.get("review_status") == earlier.decision:
            raise RegistryError(f"v{version.version} is not awaiting review (review_status: {earlier.decision} "
                                f"by {earlier.reviewer})")
        _finish_review(mlflow_client, ledger, params, name, version, earlier)
        if earlier.reviewer == reviewer and earlier.decision == decision:
            return get_version(mlflow_client, name, version.version)
        raise RegistryError(f"v{version.version} was already {earlier.decision} by {earlier.reviewer}")
    version = _reviewable(mlflow_client, name, number)
    candidate = get_alias(mlflow_client, name, CANDIDATE)
    if candidate is None or str(candidate.version) != str(version.version):
        raise RegistryError(f"v{version.version} no longer holds the '{CANDIDATE}' alias")
    champion = get_alias(mlflow_client, name, CHAMPION)
    if approving:
        base = version.tags.get("base_version")
        if champion is None or base != str(champion.version):
            raise RegistryError(f"v{version.version} was unlearned from v{base}, but the champion is now "
                                f"v{champion.version if champion else 'none'}; it is out of date")
    request_ids = request_ids_of(version)
    aliases = [(CANDIDATE, None, str(version.version))]
    if approving:
        aliases.insert(0, (CHAMPION, str(version.version), None if champion is None else str(champion.version)))
    try:
        review = ledger.decide(name, str(version.version), decision, reviewer, reason, request_ids, moves, aliases)
    except Refused as err:
        raise RegistryError(str(err)) from None
    return _finish_review(mlflow_client, ledger, params, name, version, review)


def approve(mlflow_client, ledger: Ledger, params: dict, number: int | str, reviewer: str, reason: str | None = None):
    """Make candidate `number` the champion; its requests become `approved` and deleted.

    The ledger records the decision and the requests' approval in one transaction (refused if
    another reviewer decided first); then the deletion list, the aliases and the version's tags
    follow from that record. Running it again finishes an interrupted approval."""
    note = f"approved v{number}" + (f": {reason}" if reason else "")
    return _decide(mlflow_client, ledger, params, number, reviewer, reason, APPROVED,
                   [(Status.approved, note)], approving=True)


def reject(mlflow_client, ledger: Ledger, params: dict, number: int | str, reviewer: str, reason: str,
           reject_requests: bool = False):
    """Turn candidate `number` down; its requests go to `failed` (or `rejected`), with the reason."""
    if not reason or not reason.strip():
        raise ConfigError("a rejection needs a reason (non-blank)")
    note = f"candidate v{number} rejected by {reviewer}: {reason}"
    moves = ([(Status.rejected, note)] if reject_requests else
             # unlearned -> failed is not a ledger transition; processing -> failed is.
             [(Status.processing, note),
              (Status.failed, f"{note}; change ops.method or its hyperparameters, then `unlearnops request retry`")])
    return _decide(mlflow_client, ledger, params, number, reviewer, reason, REJECTED, moves, approving=False)
