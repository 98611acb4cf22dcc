"""`unlearnops request submit|list|show|retry`: the ledger's command-line views (argparse lives elsewhere).

Each command returns its exit code (unlearnops/ops/errors.py): 0 on success, 1 when a submitted
request was rejected, 2 when the command itself could not run (malformed file, unknown request
id, bad arguments), 3 when the ledger's state refuses it (e.g. retrying a request that has not
failed). Errors are one line on stderr; nothing was changed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from unlearnops.ops import errors
from unlearnops.ops.ledger import OPEN, DeletionRequest, Ledger, LedgerError, Status, time_left


def _requests_table(requests: Sequence[DeletionRequest], title: str) -> Table:
    table = Table(title=title)
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("#users", justify="right", no_wrap=True)
    table.add_column("#samples", justify="right", no_wrap=True)
    table.add_column("received", no_wrap=True)
    table.add_column("due", no_wrap=True)
    table.add_column("time left", no_wrap=True)
    # A rejected request shows why it was rejected; any other the requester's reason.
    table.add_column("reason", min_width=20)
    table.add_column("model version", no_wrap=True)
    for r in requests:
        table.add_row(r.id, r.status, str(len(r.user_ids)), str(len(r.sample_ids)),
                      f"{r.received_at:%Y-%m-%d %H:%M}",
                      "-" if r.due_at is None else f"{r.due_at:%Y-%m-%d}",
                      time_left(r.due_at) if r.status in OPEN else "-",
                      escape((r.rejection_reason if r.status is Status.rejected else r.reason)
                             or ""),
                      escape(r.model_version or ""))
    return table


def cmd_submit(ledger: Ledger, samples: str | Path | pd.DataFrame,
               user_ids: Sequence[object] | None, sample_ids: Sequence[object] | None,
               file: str | Path | None, *, reason: str | None = None, actor: str | None = None,
               deleted: str | Path | pd.DataFrame | None = None) -> int:
    """Submit ids given on the command line, or the requests in ``file`` (not both)."""
    console = Console()
    try:
        if file is not None:
            if user_ids or sample_ids:
                raise LedgerError("give either a request file or ids, not both")
            requests = ledger.submit_file(file, samples=samples, reason=reason, actor=actor,
                                          deleted=deleted)
        else:
            requests = [ledger.submit(user_ids, sample_ids, samples=samples, reason=reason,
                                      actor=actor, deleted=deleted)]
    except LedgerError as e:
        return errors.report(e)
    console.print(_requests_table(requests, "submitted deletion requests"))
    rejected = [r for r in requests if r.status is Status.rejected]
    for r in rejected:  # one line each on stderr (the table above is on stdout)
        print(f"{r.id} rejected: {errors.one_line(ValueError(r.rejection_reason or ''))}", file=sys.stderr)
    return 1 if rejected else 0


def cmd_list(ledger: Ledger, status: str | None = None, overdue: bool = False) -> int:
    console = Console()
    try:
        requests = ledger.list(status, overdue=overdue)
    except LedgerError as e:
        return errors.report(e)
    title = f"deletion requests ({status or 'all'}{', overdue' if overdue else ''})"
    console.print(_requests_table(requests, title))
    return 0


def cmd_show(ledger: Ledger, request_id: str) -> int:
    console = Console()
    try:
        request = ledger.get(request_id)
        events = ledger.events(request_id)
    except LedgerError as e:
        return errors.report(e)
    console.print(_requests_table([request], f"deletion request {request.id}"))
    details = Table(show_header=False, box=None)
    for name, value in [
        ("user ids", request.user_ids),
        ("requested sample ids", request.requested_sample_ids),
        ("sample ids to delete", request.sample_ids),
        ("reason", request.reason),
        ("rejection reason", request.rejection_reason),
        ("extra", request.extra),
    ]:
        details.add_row(name, "" if value is None else escape(str(value)))
    console.print(details)
    history = Table(title="history")
    for column in ("at", "from", "to", "actor", "note"):
        history.add_column(column)
    for e in events:
        history.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.from_status or "", e.to_status,
                        escape(e.actor or ""), escape(e.note or ""))
    console.print(history)
    return 0


def cmd_retry(ledger: Ledger, request_ids: Sequence[str], actor: str | None = None) -> int:
    """Queue failed requests for the next deletion run (failed -> received), all or none:
    every id is checked (known, given once, failed) before any changes."""
    console = Console()
    try:
        requests = ledger.transition_many(
            list(request_ids), Status.received, actor=actor, note="retry: queued for the next deletion run",
            expect=lambda r: None if r.status is Status.failed else
            f"only failed requests can be retried (status {r.status})")
    except LedgerError as e:
        return errors.report(e)
    console.print(_requests_table(requests, "queued for the next deletion run"))
    return 0
