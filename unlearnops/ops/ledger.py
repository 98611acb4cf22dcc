"""Deletion-request ledger: the audit trail of every request to delete people's data.

A request is stored as soon as it is submitted, even when validation rejects it, and every
status change is written together with an event row in the same transaction, so the history
of a request can always be replayed from ``request_events``.

Ids are sequential strings ``req-000001``, ``req-000002``, ... (readable in tickets and in
MLflow tags, and sortable in submission order). The number comes from the database: a row of
the autoincrement table ``request_numbers``, inserted in the same transaction as the request,
so concurrent submits never collide. On SQLite every transaction begins IMMEDIATE (one writer
at a time, others wait up to 30 s), so a check and the change it guards cannot interleave.

Each request stores when it was received and when it is due (``received_at`` + the deadline,
params.yaml ``ops.deadline_days``). The ledger also holds the deletion run's lease (one run at
a time; a crashed run's lease expires), every review decision (one per model version: the
compare-and-set that makes two concurrent approvals have one winner) and every move of a
registry alias (MLflow keeps no history of aliases).

An older ledger database is migrated when opened: missing tables are created and missing
columns added (due dates filled from ``received_at``); nothing stored is changed or lost.

User ids resolve to every sample the user owns in the TRAIN split that is not already
deleted. Only training samples influenced the model, so only they can be unlearned: explicit
val/test sample ids are rejected, and a user with no training samples is rejected.
"""

from __future__ import annotations

import json
import re
from numbers import Integral
from collections.abc import Callable, Iterable, Sequence
import os
import socket
import uuid
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (JSON, DateTime, Enum, ForeignKey, Integer, String, create_engine, event, func,
                        inspect, select, text)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from unlearnops.files import write_text_atomic

DELETED_COLUMNS = ["sample_id", "user_id", "request_id", "approved_at"]


DEFAULT_DEADLINE_DAYS = 30
LEDGER_ENV = "UNLEARNOPS_LEDGER_URL"  # overrides params.yaml ops.ledger_url
LEASE_NAME = "deletion-run"


class LedgerError(Exception):
    """A request to the ledger that cannot be carried out (nothing was changed): bad input."""


class Refused(LedgerError):
    """The ledger's state does not allow the action (illegal transition, decided already, lease
    held by another run); nothing was changed."""


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
    # failed -> received queues a request again (`request retry`): only a run that holds the
    # lease moves requests to processing. failed -> rejected gives up on a request for good.
    Status.failed: frozenset({Status.received, Status.processing, Status.rejected}),
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
    # Legal deadline: received_at + ops.deadline_days (nullable only for databases migrated
    # from before due dates, whose rows are filled in when opened).
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
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


class RequestNumber(Base):
    """The database's sequence of request numbers (one row per submitted request)."""

    __tablename__ = "request_numbers"
    __table_args__ = {"sqlite_autoincrement": True}  # numbers are never reused

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)


class Lease(Base):
    """Who runs the deletion flow: one row per lease name while a run holds it."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Review(Base):
    """The one decision on a candidate version; the primary key makes it compare-and-set."""

    __tablename__ = "reviews"

    model_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    decision: Mapped[str] = mapped_column(String(16))  # approved | rejected
    reviewer: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None]
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    request_ids: Mapped[list[str]] = mapped_column(JSON)


class AliasEvent(Base):
    """Every move of a registry alias, in order (MLflow keeps only the current one)."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[str | None] = mapped_column(String(64))  # None: the alias was removed
    previous_version: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str | None]
    note: Mapped[str | None]


def lease_holder() -> str:
    """This process as a lease holder: host:pid:random (a dead pid on this host frees it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_dead(holder: str) -> bool:
    """True if `holder` is a process of this host that no longer exists."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def time_left(due_at: datetime | None, now: datetime | None = None) -> str:
    """'12d 3h left', '5h left' or 'OVERDUE 2d 1h'."""
    if due_at is None:
        return "-"
    delta = due_at - (now or _now())
    seconds = abs(delta.total_seconds())
    days, hours = int(seconds // 86400), int(seconds % 86400 // 3600)
    span = f"{days}d {hours}h" if days else f"{hours}h {int(seconds % 3600 // 60)}m"
    return f"{span} left" if delta.total_seconds() >= 0 else f"OVERDUE {span}"


# Statuses of requests whose obligation is still open (the data is not yet deleted).
OPEN = (Status.received, Status.processing, Status.failed, Status.unlearned)


def _table(source: str | Path | pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    """``source`` as a DataFrame (read if a path), checked to have ``columns``."""
    if isinstance(source, pd.DataFrame):
        df = source
    else:
        if not Path(source).is_file():
            raise LedgerError(f"{what} {source} is not a file")
        try:
            df = pd.read_csv(source)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
            raise LedgerError(f"{what} {source} cannot be read: {str(e).strip().splitlines()[0]}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        name = what if isinstance(source, pd.DataFrame) else f"{what} {source}"
        raise LedgerError(f"{name} lacks columns {missing}")
    return df


_INT = re.compile(r"[0-9]+", re.ASCII)  # ASCII digits only: '١٢' is not the id 12


def _as_int(value: object) -> int | None:
    """The integer an id denotes, or None. Bools and floats are not ids, even 1.0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Integral):  # int and numpy integers
        return int(value) if int(value) >= 0 else None
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def _parse_ids(values: Iterable[object] | None, kind: str, problems: list[str]) -> list[int]:
    # A lone string is one id: list("123") would silently become ids 1, 2 and 3.
    values = [values] if isinstance(values, str) else list(values or [])
    ids = [_as_int(v) for v in values]
    bad = [v for v, i in zip(values, ids) if i is None]
    if bad:
        problems.append(f"non-integer {kind} ids: {bad} (ids are ASCII digits)")
    return sorted({i for i in ids if i is not None})


class Ledger:
    """The ledger stored at a SQLAlchemy ``url`` (e.g. ``sqlite:///ledger.db``)."""

    def __init__(self, url: str, deadline_days: int = DEFAULT_DEADLINE_DAYS) -> None:
        self.deadline = timedelta(days=deadline_days)
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"timeout": 30} if sqlite else {})
        if sqlite:
            # pysqlite's own transaction handling would begin DEFERRED, letting two
            # transactions read the same state and then both write; IMMEDIATE takes the write
            # lock at BEGIN, so a check and the write it guards cannot interleave.
            @event.listens_for(self.engine, "connect")
            def _connect(dbapi_connection, _record) -> None:
                dbapi_connection.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin(connection) -> None:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
        self._migrate()
        # Returned requests stay readable after their session closes.
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _migrate(self) -> None:
        """Create missing tables, add missing columns, seed the request-number sequence."""
        Base.metadata.create_all(self.engine)
        columns = {c["name"] for c in inspect(self.engine).get_columns("deletion_requests")}
        with self.engine.begin() as conn:
            if "due_at" not in columns:
                kind = DateTime().compile(dialect=self.engine.dialect)  # DATETIME, TIMESTAMP, ...
                conn.execute(text(f"ALTER TABLE deletion_requests ADD COLUMN due_at {kind}"))
            rows = conn.execute(select(DeletionRequest.id, DeletionRequest.received_at)
                                .where(DeletionRequest.due_at.is_(None))).all()
            for request_id, received in rows:
                conn.execute(DeletionRequest.__table__.update()
                             .where(DeletionRequest.id == request_id)
                             .values(due_at=received + self.deadline))
            # Requests stored before the sequence existed: continue after the highest number.
            numbers = [int(i[4:]) for i in conn.scalars(select(DeletionRequest.id))
                       if i.startswith("req-") and i[4:].isdigit()]
            top = conn.scalar(select(func.max(RequestNumber.number))) or 0
            if numbers and max(numbers) > top:
                conn.execute(RequestNumber.__table__.insert().values(number=max(numbers)))

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
        received = received_at or now
        with self._session.begin() as session:
            number = RequestNumber()
            session.add(number)
            session.flush()  # the database assigns the number
            request = DeletionRequest(
                id=f"req-{number.number:06d}", status=status, received_at=received,
                due_at=received + self.deadline,
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
        if deleted is not None and not isinstance(deleted, pd.DataFrame):
            if Path(deleted).exists() and not Path(deleted).is_file():
                raise LedgerError(f"deletion list {deleted} is not a file (data.deleted)")
        if isinstance(deleted, pd.DataFrame) or (
                deleted is not None and Path(deleted).is_file() and Path(deleted).stat().st_size):
            table = _table(deleted, ["sample_id", "user_id"], "deletion list")
            for column, into in (("sample_id", gone_samples), ("user_id", gone_users)):
                for row, cell in enumerate(table[column], start=2):
                    value = _as_int(cell if not isinstance(cell, float) or not cell.is_integer()
                                    else int(cell))
                    if value is None:
                        raise LedgerError(f"deletion list {deleted if not isinstance(deleted, pd.DataFrame) else ''}"
                                          f" line {row}: {column} {cell!r} is not an id")
                    into.add(value)
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

    def list(self, status: Status | str | Iterable[Status | str] | None = None,
             overdue: bool = False) -> list[DeletionRequest]:
        """Requests in submission order; only those with ``status`` (one or several) if given;
        with ``overdue`` only open requests (not yet deleted or rejected) past their due date."""
        # By length first, so that req-1000000 comes after req-999999.
        query = select(DeletionRequest).order_by(func.length(DeletionRequest.id),
                                                 DeletionRequest.id)
        if status is not None:
            wanted = [status] if isinstance(status, str) else status
            query = query.where(DeletionRequest.status.in_([_status(s) for s in wanted]))
        if overdue:
            query = query.where(DeletionRequest.status.in_(OPEN), DeletionRequest.due_at < _now())
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
        return self.transition_many([request_id], to_status, actor=actor, note=note,
                                    model_version=model_version, extra=extra)[0]

    def transition_many(
        self,
        request_ids: Sequence[str],
        to_status: Status | str,
        actor: str | None = None,
        note: str | None = None,
        model_version: str | None = None,
        extra: dict[str, Any] | None = None,
        expect: Callable[[DeletionRequest], str | None] | None = None,
        session: Session | None = None,
    ) -> list[DeletionRequest]:
        """Move every request to ``to_status`` in ONE transaction, or none of them.

        Every id is checked first (known, not repeated, legal transition, and ``expect(request)``
        returning no complaint), then all change together with their events."""
        if session is None:
            with self._session.begin() as own:
                return self.transition_many(request_ids, to_status, actor, note, model_version,
                                            extra, expect, own)
        to_status = _status(to_status)
        ids = list(request_ids)
        repeated = sorted({r for r in ids if ids.count(r) > 1})
        if repeated:
            raise LedgerError(f"request ids given more than once: {', '.join(repeated)}")
        requests = [session.get(DeletionRequest, r) for r in ids]
        unknown = [r for r, req in zip(ids, requests) if req is None]
        if unknown:
            raise LedgerError(f"no deletion request {', '.join(map(repr, unknown))}")
        for request in requests:
            complaint = expect(request) if expect else None
            if complaint:
                raise Refused(f"{request.id}: {complaint}")
            if to_status not in TRANSITIONS[request.status]:
                allowed = ", ".join(sorted(TRANSITIONS[request.status])) or "none (final)"
                raise Refused(f"{request.id}: illegal transition {request.status} -> "
                              f"{to_status} (allowed: {allowed})")
        now = _now()
        for request in requests:
            session.add(RequestEvent(request_id=request.id, from_status=request.status,
                                     to_status=to_status, at=now, actor=actor, note=note))
            request.status = to_status
            request.updated_at = now
            if to_status is Status.rejected:
                request.rejection_reason = note
            if model_version is not None:
                request.model_version = model_version
            if extra:
                request.extra = {**request.extra, **extra}  # a new dict, so the change is saved
        session.flush()
        return requests

    # ------------------------------------------------------------ run settlement

    def fail_processing(self, reason: str, error_class: str, actor: str | None = None,
                        candidate_version: str | None = None) -> tuple[list[str], list[str]]:
        """A run failed: every request it holds (status processing) settles in ONE transaction
        with its audit event: back to `unlearned` if the pending candidate `candidate_version`
        still covers it, else `failed` with the reason and the error's class.
        Returns (failed ids, kept ids)."""
        note = f"{reason} [{error_class}]"
        with self._session.begin() as session:
            held = list(session.scalars(select(DeletionRequest)
                                        .where(DeletionRequest.status == Status.processing)))
            kept = [r.id for r in held
                    if candidate_version is not None and r.model_version == candidate_version]
            failed = [r.id for r in held if r.id not in kept]
            if kept:
                self.transition_many(kept, Status.unlearned, actor=actor, session=session,
                                     note=f"this run failed ({note}); still in candidate "
                                          f"v{candidate_version}")
            if failed:
                self.transition_many(failed, Status.failed, actor=actor, note=note, session=session,
                                     extra={"error_class": error_class, "error": reason})
        return _ledger_sorted(failed), _ledger_sorted(kept)

    # ------------------------------------------------------------ lease

    def acquire_lease(self, holder: str, ttl_seconds: float, name: str = LEASE_NAME) -> Lease:
        """Take the lease for `holder`, or raise Refused naming the live holder. An expired
        lease, or one whose holder process on this host is gone, is taken over."""
        now = _now()
        with self._session.begin() as session:
            lease = session.get(Lease, name)
            if lease is not None and lease.holder != holder and lease.expires_at > now \
                    and not _holder_dead(lease.holder):
                raise Refused(f"another deletion run holds the lease ({lease.holder}, heartbeat "
                              f"{lease.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC, expires "
                              f"{lease.expires_at:%H:%M:%S} UTC)")
            if lease is None:
                lease = Lease(name=name, holder=holder, acquired_at=now, heartbeat_at=now,
                              expires_at=now + timedelta(seconds=ttl_seconds))
                session.add(lease)
            else:
                lease.holder, lease.acquired_at, lease.heartbeat_at = holder, now, now
                lease.expires_at = now + timedelta(seconds=ttl_seconds)
        return lease

    def heartbeat(self, holder: str, ttl_seconds: float, name: str = LEASE_NAME) -> bool:
        """Extend the lease if `holder` still has it; False if it was lost."""
        now = _now()
        with self._session.begin() as session:
            lease = session.get(Lease, name)
            if lease is None or lease.holder != holder:
                return False
            lease.heartbeat_at, lease.expires_at = now, now + timedelta(seconds=ttl_seconds)
        return True

    def release_lease(self, holder: str, name: str = LEASE_NAME) -> None:
        with self._session.begin() as session:
            lease = session.get(Lease, name)
            if lease is not None and lease.holder == holder:
                session.delete(lease)

    def lease(self, name: str = LEASE_NAME) -> Lease | None:
        with self._session() as session:
            return session.get(Lease, name)

    # ------------------------------------------------------------ reviews and aliases

    def decide(self, model_name: str, version: str, decision: str, reviewer: str,
               reason: str | None, request_ids: Sequence[str], moves: Sequence[tuple[Status, str]],
               aliases: Sequence[tuple[str, str | None, str | None]] = ()) -> Review:
        """Record the one decision on a version, and move its requests, in ONE transaction.

        Compare-and-set: refused if the version was already decided, or if any request is not
        `unlearned` into this version. `moves`: (status, note) steps every request takes;
        `aliases`: (alias, new version or None, previous version) moves to append."""
        if not reviewer or not reviewer.strip():
            raise LedgerError("a reviewer name is required (non-blank)")
        now = _now()

        def unlearned_into_version(request: DeletionRequest) -> str | None:
            if request.status is not Status.unlearned or request.model_version != version:
                return (f"not unlearned into v{version} (status {request.status}, model version "
                        f"{request.model_version})")
            return None

        try:
            with self._session.begin() as session:
                earlier = session.get(Review, (model_name, version))
                if earlier is not None:
                    raise Refused(f"v{version} was already {earlier.decision} by {earlier.reviewer} "
                                  f"at {earlier.at:%Y-%m-%d %H:%M:%S} UTC")
                review = Review(model_name=model_name, version=version, decision=decision,
                                reviewer=reviewer, reason=reason, at=now,
                                request_ids=list(request_ids))
                session.add(review)
                session.flush()  # the primary key is the compare-and-set
                expect = unlearned_into_version
                for status, note in moves:
                    self.transition_many(request_ids, status, actor=reviewer, note=note,
                                         expect=expect, session=session)
                    expect = None
                for alias, new, previous in aliases:
                    session.add(AliasEvent(model_name=model_name, alias=alias, version=new,
                                           previous_version=previous, at=now, actor=reviewer,
                                           note=f"{decision} v{version}"))
        except IntegrityError:
            raise Refused(f"v{version} was decided by another reviewer at the same time") from None
        return review

    def review(self, model_name: str, version: str) -> Review | None:
        with self._session() as session:
            return session.get(Review, (model_name, str(version)))

    def record_alias(self, model_name: str, alias: str, version: str | None,
                     previous: str | None, actor: str | None = None, note: str | None = None) -> None:
        with self._session.begin() as session:
            session.add(AliasEvent(model_name=model_name, alias=alias, version=version,
                                   previous_version=previous, at=_now(), actor=actor, note=note))

    def alias_history(self, model_name: str) -> list[AliasEvent]:
        query = (select(AliasEvent).where(AliasEvent.model_name == model_name)
                 .order_by(AliasEvent.id))
        with self._session() as session:
            return list(session.scalars(query))

    def forget_sample_ids(self, request_ids: Iterable[str]) -> list[int]:
        """Sorted union of the samples to delete for these requests."""
        return sorted({s for r in request_ids for s in self.get(r).sample_ids})


def _ledger_sorted(request_ids: Iterable[str]) -> list[str]:
    return sorted(set(request_ids), key=lambda r: (len(r), r))


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
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
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


def ledger_url(params: dict) -> str:
    return os.environ.get(LEDGER_ENV) or str(params["ops"]["ledger_url"])


def open_ledger(params: dict) -> Ledger:
    """The deletion ledger of params.yaml `ops` (UNLEARNOPS_LEDGER_URL overrides its URL)."""
    return Ledger(ledger_url(params), int(params["ops"].get("deadline_days", DEFAULT_DEADLINE_DAYS)))
