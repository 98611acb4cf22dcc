"""Deletion-request ledger: the audit trail of every request to delete people's data.

A request is stored as soon as it is submitted, even when validation rejects it, and every
status change is written together with an event row in the same transaction, so the history
of a request can always be replayed from ``request_events``.

Ids are sequential strings ``req-000001``, ``req-000002``, ... (readable in tickets and in
MLflow tags, and sortable in submission order). They are allocated as ``1 + number of
requests``: requests are never deleted, so the number never repeats. Two processes
submitting at the very same moment may pick the same id; the primary key makes the second
one fail with an ``IntegrityError`` and write nothing, so it can simply be re-run.

User ids resolve to every sample the user owns in the TRAIN split that is not already
deleted. Only training samples influenced the model, so only they can be unlearned: explicit
val/test sample ids are rejected, and a user with no training samples is rejected.
"""

from __future__ import annotations

import json
import re
from numbers import Integral
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import JSON, DateTime, Enum, ForeignKey, String, create_engine, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from unlearnops.files import write_text_atomic

DELETED_COLUMNS = ["sample_id", "user_id", "request_id", "approved_at"]


class LedgerError(Exception):
    """A request to the ledger that cannot be carried out (nothing was changed)."""


class Status(StrEnum):
    received = "received"
    rejected = "rejected"
    processing = "processing"
    unlearned = "unlearned"
    approved = "approved"
    deployed = "deployed"
    failed = "failed"


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.received: frozenset({Status.processing, Status.rejected}),
    # processing -> received lets the pipeline resume a request after a crash.
    Status.processing: frozenset({Status.unlearned, Status.failed, Status.received}),
    # failed -> rejected lets an operator give up on a request that can never succeed.
    Status.failed: frozenset({Status.processing, Status.rejected}),
    # unlearned -> processing re-runs unlearning when the reviewer wants another attempt.
    Status.unlearned: frozenset({Status.approved, Status.rejected, Status.processing}),
    Status.approved: frozenset({Status.deployed}),
    Status.rejected: frozenset(),
    Status.deployed: frozenset(),
}

# Samples of these requests count as deleted: they are (or are about to be) in the deletion list.
DONE = (Status.approved, Status.deployed)


def _status(value: Status | str) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise LedgerError(f"unknown status {value!r}; one of {', '.join(Status)}") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC and returns timezone-aware datetimes (SQLite would drop the zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


# Stored as the status name in a plain string column, so any database can hold it.
STATUS_TYPE = Enum(Status, native_enum=False, length=16)


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[Status] = mapped_column(STATUS_TYPE, index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # As asked by the requester.
    user_ids: Mapped[list[int]] = mapped_column(JSON)
    requested_sample_ids: Mapped[list[int]] = mapped_column(JSON)
    # What will be deleted: the requested samples plus the users' training samples, sorted;
    # sample_user_ids[i] owns sample_ids[i] (the deletion list records both). Empty if rejected.
    sample_ids: Mapped[list[int]] = mapped_column(JSON)
    sample_user_ids: Mapped[list[int]] = mapped_column(JSON)
    reason: Mapped[str | None]  # why the requester wants the deletion
    rejection_reason: Mapped[str | None]
    model_version: Mapped[str | None] = mapped_column(String(64))
    extra: Mapped[dict[str, Any]] = mapped_column(JSON)  # e.g. MLflow run ids
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RequestEvent(Base):
    __tablename__ = "request_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), index=True)
    from_status: Mapped[Status | None] = mapped_column(STATUS_TYPE)
    to_status: Mapped[Status] = mapped_column(STATUS_TYPE)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str | None]
    note: Mapped[str | None]


def _table(source: str | Path | pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    """``source`` as a DataFrame (read if a path), checked to have ``columns``."""
    df = source if isinstance(source, pd.DataFrame) else pd.read_csv(source)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        name = what if isinstance(source, pd.DataFrame) else f"{what} {source}"
        raise LedgerError(f"{name} lacks columns {missing}")
    return df


_INT = re.compile(r"[+-]?\d+")


def _as_int(value: object) -> int | None:
    """The integer an id denotes, or None. Bools and floats are not ids, even 1.0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Integral):  # int and numpy integers
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def _parse_ids(values: Iterable[object] | None, kind: str, problems: list[str]) -> list[int]:
    # A lone string is one id: list("123") would silently become ids 1, 2 and 3.
    values = [values] if isinstance(values, str) else list(values or [])
    ids = [_as_int(v) for v in values]
    bad = [v for v, i in zip(values, ids) if i is None]
    if bad:
        problems.append(f"non-integer {kind} ids: {bad}")
    return sorted({i for i in ids if i is not None})


class Ledger:
    """The ledger stored at a SQLAlchemy ``url`` (e.g. ``sqlite:///ledger.db``)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        Base.metadata.create_all(self.engine)
        # Returned requests stay readable after their session closes.
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def submit(
        self,
        user_ids: Iterable[object] | None = None,
        sample_ids: Iterable[object] | None = None,
        *,
        samples: str | Path | pd.DataFrame,
        reason: str | None = None,
        actor: str | None = None,
        deleted: str | Path | pd.DataFrame | None = None,
        received_at: datetime | None = None,
    ) -> DeletionRequest:
        """Validate and store a request; an invalid one is stored with status ``rejected``.

        ``samples`` is the prepared samples table (the universe of known ids); ``deleted`` the
        deletion list, if any, whose samples cannot be deleted twice. ``received_at`` back-dates
        a request that arrived earlier (e.g. by email): legal deadlines run from that moment.
        """
        problems: list[str] = []
        users = _parse_ids(user_ids, "user", problems)
        requested = _parse_ids(sample_ids, "sample", problems)
        if not problems and not users and not requested:
            problems.append("empty request: no user ids and no sample ids")
        resolved = {} if problems else self._resolve(users, requested, samples, deleted, problems)
        now = _now()
        status = Status.rejected if problems else Status.received
        rejection = "; ".join(problems) or None
        with self._session.begin() as session:
            number = session.scalar(select(func.count()).select_from(DeletionRequest)) or 0
            request = DeletionRequest(
                id=f"req-{number + 1:06d}", status=status, received_at=received_at or now,
                user_ids=users, requested_sample_ids=requested,
                sample_ids=[] if problems else sorted(resolved),
                sample_user_ids=[] if problems else [resolved[s] for s in sorted(resolved)],
                reason=reason, rejection_reason=rejection, extra={},
                created_at=now, updated_at=now,
            )
            session.add(request)
            session.add(RequestEvent(request_id=request.id, from_status=None, to_status=status,
                                     at=now, actor=actor, note=rejection))
        return request

    def _resolve(self, users: list[int], requested: list[int],
                 samples: str | Path | pd.DataFrame, deleted: str | Path | pd.DataFrame | None,
                 problems: list[str]) -> dict[int, int]:
        """Map every sample to delete to its owner; record why ids cannot be deleted."""
        table = _table(samples, ["sample_id", "user_id", "split"], "samples table")
        gone_samples, gone_users = self._deleted(deleted)
        owner = dict(zip(table["sample_id"], table["user_id"]))
        split = dict(zip(table["sample_id"], table["split"]))
        train = table[(table["split"] == "train") & ~table["sample_id"].isin(gone_samples)]

        explicit = {
            "already deleted sample ids": [s for s in requested if s in gone_samples],
            "unknown sample ids": [s for s in requested if s not in gone_samples and s not in owner],
            "sample ids outside the train split (only training samples can be unlearned)":
                [s for s in requested if s in split and s not in gone_samples
                 and split[s] != "train"],
        }
        by_user = train.groupby("user_id")["sample_id"].apply(list).to_dict()
        known_users = set(table["user_id"])
        unresolved = [u for u in users if u not in by_user]
        per_user = {
            "user ids whose training samples are all already deleted":
                [u for u in unresolved if u in gone_users],
            "unknown user ids": [u for u in unresolved if u not in gone_users
                                 and u not in known_users],
            "user ids with no training samples": [u for u in unresolved if u not in gone_users
                                                  and u in known_users],
        }
        problems += [f"{what}: {ids}" for what, ids in {**explicit, **per_user}.items() if ids]
        if problems:
            return {}

        resolved = {s: int(owner[s]) for s in requested}
        for u in users:
            resolved.update({int(s): u for s in by_user.get(u, [])})
        return resolved

    def _deleted(self, deleted: str | Path | pd.DataFrame | None) -> tuple[set[int], set[int]]:
        """(sample ids, user ids) already deleted: in the deletion list or an approved request."""
        gone_samples: set[int] = set()
        gone_users: set[int] = set()
        if isinstance(deleted, pd.DataFrame) or (
                deleted is not None and Path(deleted).exists() and Path(deleted).stat().st_size):
            table = _table(deleted, ["sample_id", "user_id"], "deletion list")
            gone_samples |= {int(s) for s in table["sample_id"]}
            gone_users |= {int(u) for u in table["user_id"]}
        for request in self.list(DONE):
            gone_samples |= set(request.sample_ids)
            gone_users |= set(request.user_ids) | set(request.sample_user_ids)
        return gone_samples, gone_users

    def submit_file(
        self,
        path: str | Path,
        samples: str | Path | pd.DataFrame,
        *,
        reason: str | None = None,
        actor: str | None = None,
        deleted: str | Path | pd.DataFrame | None = None,
    ) -> list[DeletionRequest]:
        """Submit the requests in a CSV or JSON file (see ``read_request_file``).

        ``reason`` applies to requests whose JSON object gives none.
        """
        return [self.submit(users, sample_ids, samples=samples, reason=own_reason or reason,
                            actor=actor, deleted=deleted)
                for users, sample_ids, own_reason in read_request_file(path)]

    def get(self, request_id: str) -> DeletionRequest:
        with self._session() as session:
            request = session.get(DeletionRequest, request_id)
        if request is None:
            raise LedgerError(f"no deletion request {request_id!r}")
        return request

    def list(self, status: Status | str | Iterable[Status | str] | None = None
             ) -> list[DeletionRequest]:
        """Requests in submission order; only those with ``status`` (one or several) if given."""
        # By length first, so that req-1000000 comes after req-999999.
        query = select(DeletionRequest).order_by(func.length(DeletionRequest.id),
                                                 DeletionRequest.id)
        if status is not None:
            wanted = [status] if isinstance(status, str) else status
            query = query.where(DeletionRequest.status.in_([_status(s) for s in wanted]))
        with self._session() as session:
            return list(session.scalars(query))

    def events(self, request_id: str) -> list[RequestEvent]:
        self.get(request_id)  # an unknown id is an error, not an empty history
        query = (select(RequestEvent).where(RequestEvent.request_id == request_id)
                 .order_by(RequestEvent.id))
        with self._session() as session:
            return list(session.scalars(query))

    def pending(self) -> list[DeletionRequest]:
        """Requests still to be unlearned, oldest received first."""
        return sorted(self.list([Status.received, Status.processing]),
                      key=lambda r: (r.received_at, r.id))

    def transition(
        self,
        request_id: str,
        to_status: Status | str,
        actor: str | None = None,
        note: str | None = None,
        model_version: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> DeletionRequest:
        """Move a request to ``to_status``, recording the event; ``extra`` is merged in."""
        to_status = _status(to_status)
        with self._session.begin() as session:
            request = session.get(DeletionRequest, request_id, with_for_update=True)
            if request is None:
                raise LedgerError(f"no deletion request {request_id!r}")
            if to_status not in TRANSITIONS[request.status]:
                allowed = ", ".join(sorted(TRANSITIONS[request.status])) or "none (final)"
                raise LedgerError(f"{request_id}: illegal transition {request.status} -> "
                                  f"{to_status} (allowed: {allowed})")
            now = _now()
            session.add(RequestEvent(request_id=request_id, from_status=request.status,
                                     to_status=to_status, at=now, actor=actor, note=note))
            request.status = to_status
            request.updated_at = now
            if to_status is Status.rejected:
                request.rejection_reason = note
            if model_version is not None:
                request.model_version = model_version
            if extra:
                request.extra = {**request.extra, **extra}  # a new dict, so the change is saved
        return request

    def forget_sample_ids(self, request_ids: Iterable[str]) -> list[int]:
        """Sorted union of the samples to delete for these requests."""
        return sorted({s for r in request_ids for s in self.get(r).sample_ids})


def read_request_file(path: str | Path) -> list[tuple[list[int], list[int], str | None]]:
    """(user ids, sample ids, reason) of each request in a file; LedgerError if malformed.

    CSV: columns ``user_id`` and/or ``sample_id`` (cells may be blank), the whole file is one
    request. JSON: ``{"user_ids": [...], "sample_ids": [...], "reason": "..."}`` or a list of
    such objects, one request each. Everything is checked before anything is returned, so a
    malformed file stores nothing.
    """
    path = Path(path)

    def fail(problem: str) -> LedgerError:
        return LedgerError(f"malformed request file {path}: {problem}")

    try:
        text = path.read_text()
    except OSError as e:
        raise fail(e.strerror or str(e)) from e
    if path.suffix.lower() == ".json":
        return [_json_request(obj, i, fail) for i, obj in enumerate(_json_objects(text, fail))]
    if path.suffix.lower() != ".csv":
        raise fail("expected a .csv or .json file")
    try:
        # Strings, so that '1.5' or 'abc' are reported rather than silently coerced.
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise fail(str(e).strip()) from e
    columns = [c for c in ("user_id", "sample_id") if c in table.columns]
    if not columns:
        raise fail(f"needs a user_id and/or sample_id column, found {list(table.columns)}")
    ids: dict[str, list[int]] = {"user_id": [], "sample_id": []}
    for column in columns:
        for row, cell in enumerate(table[column], start=2):  # line 1 is the header
            if cell.strip() == "":
                continue
            value = _as_int(cell)
            if value is None:
                raise fail(f"line {row}: {column} {cell!r} is not an integer")
            ids[column].append(value)
    return [(ids["user_id"], ids["sample_id"], None)]


def _json_objects(text: str, fail: Callable[[str], LedgerError]) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON: {e}") from e
    objects = data if isinstance(data, list) else [data]
    if not objects:
        raise fail("an empty list holds no request")
    return objects


def _json_request(obj: Any, index: int, fail: Callable[[str], LedgerError]
                  ) -> tuple[list[int], list[int], str | None]:
    where = f"request {index}"
    if not isinstance(obj, dict):
        raise fail(f"{where} is not an object")
    unknown = set(obj) - {"user_ids", "sample_ids", "reason"}
    if unknown:
        raise fail(f"{where} has unknown keys {sorted(unknown)} "
                   "(expected user_ids, sample_ids, reason)")
    ids: dict[str, list[int]] = {}
    for key in ("user_ids", "sample_ids"):
        values = obj.get(key, [])
        if not isinstance(values, list):
            raise fail(f"{where}: {key} must be a list")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise fail(f"{where}: {key} holds non-integers {bad}")
        ids[key] = values
    reason = obj.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise fail(f"{where}: reason must be a string")
    return ids["user_ids"], ids["sample_ids"], reason


def apply_approved(ledger: Ledger, deleted_csv_path: str | Path, request_ids: Iterable[str],
                   approved_at: datetime | str) -> int:
    """Append the samples of approved requests to the deletion list; return rows added.

    Idempotent: a (sample_id, request_id) pair already in the list is not added again, and
    existing rows are rewritten exactly as they were. The new file is written next to the old
    one and moved over it, so a crash leaves either the old or the new list, never half of one.
    """
    path = Path(deleted_csv_path)
    requests = [ledger.get(r) for r in request_ids]
    not_approved = [f"{r.id} ({r.status})" for r in requests if r.status not in DONE]
    if not_approved:
        raise LedgerError(f"only approved requests can be applied: {', '.join(not_approved)}")
    if path.exists() and path.stat().st_size:
        # Strings, so that existing rows are written back exactly as they were read.
        existing = _table(pd.read_csv(path, dtype=str, keep_default_na=False), DELETED_COLUMNS,
                          f"deletion list {path}")
    else:
        existing = pd.DataFrame(columns=DELETED_COLUMNS, dtype=str)
    at = approved_at.isoformat() if isinstance(approved_at, datetime) else approved_at
    present = set(zip(existing["sample_id"], existing["request_id"]))
    new = [{"sample_id": str(s), "user_id": str(u), "request_id": r.id, "approved_at": at}
           for r in requests for s, u in zip(r.sample_ids, r.sample_user_ids)
           if (str(s), r.id) not in present]
    if not new:
        return 0
    table = pd.concat([existing, pd.DataFrame(new, dtype=str)], ignore_index=True)
    write_text_atomic(path, table.to_csv(index=False))
    return len(new)
