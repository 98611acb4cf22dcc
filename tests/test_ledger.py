import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from unlearnops.ops.ledger import (
    TRANSITIONS,
    Ledger,
    LedgerError,
    Status,
    apply_approved,
    read_request_file,
)
from unlearnops.ops.ledger_cli import cmd_list, cmd_show, cmd_submit

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

# user 1: train 10, 12 and val 11; user 2: train 13; user 3: test 14 only; user 4: train 15.
SAMPLES = pd.DataFrame({
    "sample_id": [10, 11, 12, 13, 14, 15],
    "user_id": [1, 1, 1, 2, 3, 4],
    "label": [0, 1, 0, 1, 0, 1],
    "split": ["train", "val", "train", "train", "test", "train"],
    "forget": [False] * 6,
})


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.fixture
def samples_csv(tmp_path: Path) -> Path:
    path = tmp_path / "samples.csv"
    SAMPLES.to_csv(path, index=False)
    return path


def approve(ledger: Ledger, request_id: str) -> None:
    for status in ("processing", "unlearned", "approved"):
        ledger.transition(request_id, status, actor="test")


def snapshot(ledger: Ledger) -> list[tuple]:
    """Everything the ledger stores, to check that an operation changed nothing."""
    return [(r.id, r.status, r.sample_ids, r.model_version, r.extra, r.updated_at,
             [(e.from_status, e.to_status, e.note) for e in ledger.events(r.id)])
            for r in ledger.list()]


# --- submit ---------------------------------------------------------------------------------

def test_submit_by_user_resolves_to_their_train_samples(ledger, samples_csv):
    r = ledger.submit(user_ids=[1], samples=samples_csv, reason="GDPR art. 17", actor="alice")
    assert r.id == "req-000001"
    assert r.status is Status.received
    assert r.user_ids == [1] and r.requested_sample_ids == []
    assert r.sample_ids == [10, 12]  # not 11: validation samples never trained the model
    assert r.sample_user_ids == [1, 1]
    assert r.reason == "GDPR art. 17" and r.rejection_reason is None
    [event] = ledger.events(r.id)
    assert (event.from_status, event.to_status, event.actor) == (None, Status.received, "alice")


def test_submit_by_samples_records_owners_and_accepts_string_ids(ledger):
    r = ledger.submit(sample_ids=["13", 10], samples=SAMPLES)
    assert r.status is Status.received
    assert r.user_ids == [] and r.requested_sample_ids == [10, 13]
    assert (r.sample_ids, r.sample_user_ids) == ([10, 13], [1, 2])


def test_a_lone_string_is_one_id_not_its_digits(ledger):
    r = ledger.submit(sample_ids="13", samples=SAMPLES)
    assert (r.status, r.sample_ids) == (Status.received, [13])


def test_submit_users_and_samples_together_deletes_the_union(ledger):
    r = ledger.submit(user_ids=[2], sample_ids=[10, 13], samples=SAMPLES)
    assert (r.sample_ids, r.sample_user_ids) == ([10, 13], [1, 2])
    assert ledger.submit(user_ids=[1], samples=SAMPLES).id == "req-000002"


@pytest.mark.parametrize("user_ids, sample_ids, expected", [
    (None, None, "empty request"),
    ([], [], "empty request"),
    ([99], None, "unknown user ids: [99]"),
    (None, [999], "unknown sample ids: [999]"),
    (["abc"], None, "non-integer user ids: ['abc']"),
    (None, [1.5, True, "1.0"], "non-integer sample ids: [1.5, True, '1.0']"),
    (None, [11, 14], "outside the train split"),
    ([3], None, "user ids with no training samples: [3]"),
    ([2, 99], [10], "unknown user ids: [99]"),  # one bad id rejects the whole request
])
def test_invalid_request_is_stored_as_rejected_and_changes_nothing_else(
        ledger, user_ids, sample_ids, expected):
    earlier = ledger.submit(user_ids=[4], samples=SAMPLES)
    before = snapshot(ledger)
    r = ledger.submit(user_ids, sample_ids, samples=SAMPLES, actor="bob")
    assert r.status is Status.rejected
    assert expected in r.rejection_reason
    assert r.sample_ids == [] and r.sample_user_ids == []
    assert snapshot(ledger)[:1] == before  # the earlier request is untouched
    assert [x.id for x in ledger.list()] == [earlier.id, r.id]
    assert ledger.get(r.id).rejection_reason == r.rejection_reason  # stored, not just returned
    [event] = ledger.events(r.id)
    assert (event.to_status, event.note, event.actor) == (Status.rejected, r.rejection_reason, "bob")
    assert [p.id for p in ledger.pending()] == [earlier.id]


def test_samples_in_the_deletion_list_are_already_deleted(ledger, tmp_path):
    deleted = tmp_path / "deleted.csv"
    pd.DataFrame({"sample_id": [10, 12], "user_id": [1, 1], "request_id": ["old", "old"],
                  "approved_at": ["2024-01-01"] * 2}).to_csv(deleted, index=False)
    by_sample = ledger.submit(sample_ids=[12], samples=SAMPLES, deleted=deleted)
    by_user = ledger.submit(user_ids=[1], samples=SAMPLES, deleted=deleted)
    assert "already deleted sample ids: [12]" in by_sample.rejection_reason
    assert "all already deleted: [1]" in by_user.rejection_reason
    assert ledger.submit(user_ids=[2], samples=SAMPLES, deleted=deleted).status is Status.received


def test_deleted_samples_dropped_by_prepare_are_reported_as_deleted_not_unknown(ledger):
    # After `prepare` re-runs, deleted samples are gone from the samples table.
    deleted = pd.DataFrame({"sample_id": [10, 12], "user_id": [1, 1]})
    prepared = SAMPLES[~SAMPLES["sample_id"].isin([10, 11, 12])]
    r = ledger.submit(user_ids=[1], sample_ids=[10], samples=prepared, deleted=deleted)
    assert r.rejection_reason == ("already deleted sample ids: [10]; "
                                  "user ids whose training samples are all already deleted: [1]")


def test_samples_of_approved_requests_are_already_deleted_but_in_flight_ones_are_not(ledger):
    first = ledger.submit(user_ids=[1], samples=SAMPLES)
    # Another request for the same data while the first is in flight: the first may be rejected.
    assert ledger.submit(sample_ids=[10], samples=SAMPLES).status is Status.received
    approve(ledger, first.id)
    again = ledger.submit(sample_ids=[10], samples=SAMPLES)
    assert "already deleted sample ids: [10]" in again.rejection_reason
    ledger.transition(first.id, "deployed")
    assert "all already deleted: [1]" in ledger.submit(user_ids=[1], samples=SAMPLES).rejection_reason
    # Deleting user 4's only sample by id also deletes user 4.
    approve(ledger, ledger.submit(sample_ids=[15], samples=SAMPLES).id)
    assert "all already deleted: [4]" in ledger.submit(user_ids=[4], samples=SAMPLES).rejection_reason


def test_samples_table_without_required_columns_is_an_error_and_stores_nothing(ledger):
    with pytest.raises(LedgerError, match=r"samples table lacks columns \['split'\]"):
        ledger.submit(user_ids=[1], samples=SAMPLES.drop(columns="split"))
    assert ledger.list() == []


# --- request files --------------------------------------------------------------------------

def test_submit_csv_file_is_one_request(ledger, tmp_path, samples_csv):
    path = tmp_path / "req.csv"
    path.write_text("user_id,sample_id\n2,\n,10\n4,12\n")
    [r] = ledger.submit_file(path, samples=samples_csv, reason="ticket 7")
    assert (r.status, r.user_ids, r.requested_sample_ids) == (Status.received, [2, 4], [10, 12])
    assert r.sample_ids == [10, 12, 13, 15]
    assert r.reason == "ticket 7"


def test_submit_json_file_with_a_list_makes_one_request_each(ledger, tmp_path):
    path = tmp_path / "req.json"
    path.write_text(json.dumps([{"user_ids": [1], "reason": "email"}, {"sample_ids": [13]},
                                {"user_ids": [99]}]))
    requests = ledger.submit_file(path, samples=SAMPLES, reason="default")
    assert [(r.status, r.sample_ids, r.reason) for r in requests] == [
        (Status.received, [10, 12], "email"), (Status.received, [13], "default"),
        (Status.rejected, [], "default")]


def test_submit_json_file_with_one_object(ledger, tmp_path):
    path = tmp_path / "req.json"
    path.write_text('{"user_ids": [2], "sample_ids": [15]}')
    [r] = ledger.submit_file(path, samples=SAMPLES)
    assert r.sample_ids == [13, 15]


@pytest.mark.parametrize("name, content, problem", [
    ("r.json", '{"user_ids": [1', "invalid JSON"),
    ("r.json", '{"user_id": [1]}', "unknown keys ['user_id']"),
    ("r.json", '{"user_ids": ["1"]}', "user_ids holds non-integers ['1']"),
    ("r.json", '{"sample_ids": [1.5, true]}', "sample_ids holds non-integers [1.5, True]"),
    ("r.json", '{"sample_ids": 3}', "sample_ids must be a list"),
    ("r.json", '[{"user_ids": [1]}, 7]', "request 1 is not an object"),
    ("r.json", "[]", "empty list"),
    ("r.csv", "uid,sid\n1,2\n", "needs a user_id and/or sample_id column"),
    ("r.csv", "user_id\n1\nabc\n", "line 3: user_id 'abc' is not an integer"),
    ("r.csv", "sample_id\n1.5\n", "line 2: sample_id '1.5' is not an integer"),
    ("r.csv", "", "No columns to parse"),
    ("r.txt", "user_id\n1\n", "expected a .csv or .json file"),
])
def test_malformed_request_file_names_file_and_problem_and_stores_nothing(
        ledger, tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LedgerError) as error:
        ledger.submit_file(path, samples=SAMPLES)
    assert str(path) in str(error.value) and problem in str(error.value)
    assert ledger.list() == []


def test_missing_request_file_is_an_error(ledger, tmp_path):
    with pytest.raises(LedgerError, match="No such file"):
        ledger.submit_file(tmp_path / "nope.csv", samples=SAMPLES)


def test_csv_with_only_a_header_is_an_empty_request(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("sample_id\n")
    assert read_request_file(path) == [([], [], None)]


# --- transitions ----------------------------------------------------------------------------

def test_transitions_write_events_and_set_model_version_and_extra(ledger):
    r = ledger.submit(user_ids=[1], samples=SAMPLES)
    ledger.transition(r.id, "processing", actor="pipeline", extra={"run_id": "abc"})
    ledger.transition(r.id, Status.unlearned, actor="pipeline", note="gate passed",
                      extra={"eval_run_id": "def"})
    done = ledger.transition(r.id, "approved", actor="reviewer", model_version="7")
    assert done.status is Status.approved and ledger.get(r.id).status is Status.approved
    assert ledger.get(r.id).model_version == "7"
    assert ledger.get(r.id).extra == {"run_id": "abc", "eval_run_id": "def"}
    assert ledger.get(r.id).updated_at > r.updated_at
    events = ledger.events(r.id)
    assert [(e.from_status, e.to_status, e.actor, e.note) for e in events] == [
        (None, "received", None, None),
        ("received", "processing", "pipeline", None),
        ("processing", "unlearned", "pipeline", "gate passed"),
        ("unlearned", "approved", "reviewer", None)]
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_resume_after_crash_and_retry_after_failure_are_allowed(ledger):
    r = ledger.submit(user_ids=[1], samples=SAMPLES)
    for status in ("processing", "received", "processing", "failed", "processing", "unlearned",
                   "processing", "unlearned", "rejected"):
        ledger.transition(r.id, status, note=f"to {status}")
    assert ledger.get(r.id).status is Status.rejected
    assert ledger.get(r.id).rejection_reason == "to rejected"  # a reviewer's rejection is kept
    assert len(ledger.events(r.id)) == 10


@pytest.mark.parametrize("path, to_status", [
    ([], "approved"),  # received: the model was never unlearned
    ([], "deployed"),
    (["processing"], "approved"),
    (["processing", "unlearned", "approved"], "received"),
    (["processing", "unlearned", "approved", "deployed"], "processing"),
    (["rejected"], "processing"),
])
def test_illegal_transition_raises_and_changes_nothing(ledger, path, to_status):
    r = ledger.submit(user_ids=[1], samples=SAMPLES)
    for status in path:
        ledger.transition(r.id, status)
    before = snapshot(ledger)
    current = ledger.get(r.id).status
    with pytest.raises(LedgerError, match=f"illegal transition {current} -> {to_status}"):
        ledger.transition(r.id, to_status, actor="x", note="y", model_version="9",
                          extra={"z": 1})
    assert snapshot(ledger) == before


def test_transition_of_unknown_request_or_to_unknown_status_fails(ledger):
    with pytest.raises(LedgerError, match="no deletion request 'req-000042'"):
        ledger.transition("req-000042", "processing")
    r = ledger.submit(user_ids=[1], samples=SAMPLES)
    with pytest.raises(LedgerError, match="unknown status 'done'; one of received, rejected"):
        ledger.transition(r.id, "done")
    assert ledger.get(r.id).status is Status.received


def test_transition_table_has_every_status_and_final_states():
    assert set(TRANSITIONS) == set(Status)
    assert TRANSITIONS[Status.deployed] == TRANSITIONS[Status.rejected] == frozenset()


# --- queries --------------------------------------------------------------------------------

def test_pending_is_received_and_processing_oldest_received_first(ledger):
    def submit(user: int, days: int):
        return ledger.submit(user_ids=[user], samples=SAMPLES,
                             received_at=T0 + timedelta(days=days)).id
    late, early, middle, done = submit(1, 3), submit(2, 1), submit(4, 2), submit(1, 0)
    ledger.submit(user_ids=[99], samples=SAMPLES, received_at=T0)  # rejected
    ledger.transition(middle, "processing")
    for status in ("processing", "unlearned"):
        ledger.transition(done, status)
    assert [r.id for r in ledger.pending()] == [early, middle, late]


def test_received_at_is_stored_as_utc_and_read_back_aware(ledger):
    paris = datetime(2025, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    r = ledger.submit(user_ids=[1], samples=SAMPLES, received_at=paris)
    stored = ledger.get(r.id).received_at
    assert stored == paris and stored.tzinfo == timezone.utc and stored.hour == 11


def test_list_filters_by_status_in_submission_order(ledger):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    b = ledger.submit(user_ids=[99], samples=SAMPLES).id
    c = ledger.submit(user_ids=[2], samples=SAMPLES).id
    assert [r.id for r in ledger.list()] == [a, b, c]
    assert [r.id for r in ledger.list("received")] == [a, c]
    assert [r.id for r in ledger.list(["rejected", Status.received])] == [a, b, c]


def test_list_orders_ids_past_a_million_numerically(ledger):
    for user, new_id in [(1, "req-999999"), (2, "req-1000000")]:
        old_id = ledger.submit(user_ids=[user], samples=SAMPLES).id
        with ledger.engine.begin() as connection:  # as if the ledger had grown that far
            connection.exec_driver_sql(
                f"UPDATE deletion_requests SET id = '{new_id}' WHERE id = '{old_id}'")
    assert [r.id for r in ledger.list()] == ["req-999999", "req-1000000"]


def test_forget_sample_ids_is_the_sorted_union(ledger):
    a = ledger.submit(user_ids=[2], samples=SAMPLES).id
    b = ledger.submit(sample_ids=[13, 10], samples=SAMPLES).id
    c = ledger.submit(user_ids=[4], samples=SAMPLES).id
    assert ledger.forget_sample_ids([a, b]) == [10, 13]
    assert ledger.forget_sample_ids([c, a]) == [13, 15]
    with pytest.raises(LedgerError):
        ledger.forget_sample_ids([a, "req-999999"])


def test_events_of_unknown_request_is_an_error(ledger):
    with pytest.raises(LedgerError, match="no deletion request"):
        ledger.events("req-000001")


# --- persistence ----------------------------------------------------------------------------

def test_second_ledger_on_the_same_file_sees_the_same_state(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    first = Ledger(url)
    r = first.submit(user_ids=[1], samples=SAMPLES)
    first.transition(r.id, "processing", actor="pipeline")
    second = Ledger(url)
    assert second.get(r.id).status is Status.processing
    assert second.get(r.id).sample_ids == [10, 12]
    assert [e.to_status for e in second.events(r.id)] == ["received", "processing"]
    assert second.submit(user_ids=[2], samples=SAMPLES).id == "req-000002"
    assert [x.id for x in first.list()] == [r.id, "req-000002"]


def test_in_memory_ledger_works():
    ledger = Ledger("sqlite://")
    r = ledger.submit(user_ids=[1], samples=SAMPLES)
    ledger.transition(r.id, "processing")
    assert [p.status for p in ledger.pending()] == [Status.processing]
    assert len(ledger.events(r.id)) == 2


# --- deletion list --------------------------------------------------------------------------

@pytest.fixture
def deleted_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "deleted.csv"
    path.parent.mkdir()
    # Written by hand: apply_approved must keep it exactly, leading zeros and all.
    path.write_text("sample_id,user_id,request_id,approved_at\n"
                    "0012,1,legacy-1,2024-01-01\n")
    return path


def test_apply_approved_appends_and_keeps_existing_rows(ledger, deleted_csv):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    b = ledger.submit(sample_ids=[13], samples=SAMPLES).id
    approve(ledger, a)
    approve(ledger, b)
    added = apply_approved(ledger, deleted_csv, [a, b], approved_at=T0)
    assert added == 3
    assert deleted_csv.read_text().splitlines() == [
        "sample_id,user_id,request_id,approved_at",
        "0012,1,legacy-1,2024-01-01",
        f"10,1,{a},2025-01-01T00:00:00+00:00",
        f"12,1,{a},2025-01-01T00:00:00+00:00",
        f"13,2,{b},2025-01-01T00:00:00+00:00"]


def test_apply_approved_is_idempotent(ledger, deleted_csv):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    approve(ledger, a)
    assert apply_approved(ledger, deleted_csv, [a], approved_at="2025-02-01") == 2
    content = deleted_csv.read_text()
    ledger.transition(a, "deployed")
    assert apply_approved(ledger, deleted_csv, [a, a], approved_at="2025-03-01") == 0
    assert deleted_csv.read_text() == content


def test_apply_approved_creates_a_missing_list(ledger, tmp_path):
    a = ledger.submit(sample_ids=[15], samples=SAMPLES).id
    approve(ledger, a)
    path = tmp_path / "new" / "deleted.csv"
    apply_approved(ledger, path, [a], approved_at="2025-02-01")
    assert pd.read_csv(path).to_dict("records") == [
        {"sample_id": 15, "user_id": 4, "request_id": a, "approved_at": "2025-02-01"}]
    # The next submission sees the list.
    r = ledger.submit(sample_ids=[15], samples=SAMPLES, deleted=path)
    assert "already deleted" in r.rejection_reason


def test_apply_approved_refuses_requests_not_approved(ledger, deleted_csv):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    b = ledger.submit(user_ids=[2], samples=SAMPLES).id
    approve(ledger, a)
    content = deleted_csv.read_text()
    with pytest.raises(LedgerError, match=f"{b} \\(received\\)"):
        apply_approved(ledger, deleted_csv, [a, b], approved_at=T0)
    assert deleted_csv.read_text() == content


def test_apply_approved_failing_midway_leaves_the_old_list_whole(ledger, deleted_csv, monkeypatch):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    approve(ledger, a)
    content = deleted_csv.read_text()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        apply_approved(ledger, deleted_csv, [a], approved_at=T0)
    assert deleted_csv.read_text() == content
    assert os.listdir(deleted_csv.parent) == ["deleted.csv"]  # no temp file left behind


def test_apply_approved_rejects_a_list_with_wrong_columns(ledger, tmp_path):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    approve(ledger, a)
    path = tmp_path / "deleted.csv"
    path.write_text("sample_id\n1\n")
    with pytest.raises(LedgerError, match="lacks columns"):
        apply_approved(ledger, path, [a], approved_at=T0)
    assert path.read_text() == "sample_id\n1\n"


# --- CLI ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich would otherwise wrap table cells at 80


def test_cmd_submit_prints_the_request(ledger, samples_csv, capsys):
    assert cmd_submit(ledger, samples_csv, [1], None, None) == 0
    out = capsys.readouterr().out
    assert "req-000001" in out and "received" in out


def test_cmd_submit_rejected_prints_reason_and_fails(ledger, capsys):
    assert cmd_submit(ledger, SAMPLES, ["7x"], [999], None) == 1
    assert "req-000001 rejected: non-integer user ids: ['7x']" in capsys.readouterr().err
    assert ledger.get("req-000001").status is Status.rejected


def test_cmd_submit_malformed_file_fails_and_stores_nothing(ledger, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text("{")
    assert cmd_submit(ledger, SAMPLES, None, None, path) == 2
    assert f"malformed request file {path}" in capsys.readouterr().err
    assert cmd_submit(ledger, SAMPLES, [1], None, path) == 2  # file and ids together
    assert ledger.list() == []


def test_cmd_submit_file(ledger, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text('[{"user_ids": [1]}, {"user_ids": [2]}]')
    assert cmd_submit(ledger, SAMPLES, None, None, path) == 0
    out = capsys.readouterr().out
    assert "req-000001" in out and "req-000002" in out


def test_cmd_list_and_show(ledger, capsys):
    a = ledger.submit(user_ids=[1], samples=SAMPLES, reason="[bold]gdpr[/]").id
    b = ledger.submit(user_ids=[99], samples=SAMPLES).id
    ledger.transition(a, "processing", actor="pipeline", note="run 42", model_version="3")
    assert cmd_list(ledger, "rejected") == 0
    out = capsys.readouterr().out
    assert b in out and a not in out and "unknown user ids: [99]" in out
    assert cmd_list(ledger) == 0
    out = capsys.readouterr().out
    assert a in out and "[bold]gdpr[/]" in out  # user text is shown, not read as markup
    assert cmd_show(ledger, a) == 0
    out = capsys.readouterr().out
    assert "processing" in out and "pipeline" in out and "run 42" in out and "[10, 12]" in out
    assert cmd_show(ledger, "req-000404") == 2
    assert "no deletion request 'req-000404'" in capsys.readouterr().err
    assert cmd_list(ledger, "bogus") == 2
    assert "unknown status 'bogus'" in capsys.readouterr().err


# --- schema migration, deadlines, all-or-nothing transitions -------------------------------

OLD_SCHEMA = """
CREATE TABLE deletion_requests (id VARCHAR(32) NOT NULL PRIMARY KEY, status VARCHAR(16) NOT NULL,
  received_at DATETIME NOT NULL, user_ids JSON NOT NULL, requested_sample_ids JSON NOT NULL,
  sample_ids JSON NOT NULL, sample_user_ids JSON NOT NULL, reason VARCHAR, rejection_reason VARCHAR,
  model_version VARCHAR(64), extra JSON NOT NULL, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
CREATE TABLE request_events (id INTEGER NOT NULL PRIMARY KEY, request_id VARCHAR(32) NOT NULL
  REFERENCES deletion_requests (id), from_status VARCHAR(16), to_status VARCHAR(16) NOT NULL,
  at DATETIME NOT NULL, actor VARCHAR, note VARCHAR);
INSERT INTO deletion_requests VALUES ('req-000001', 'received', '2025-01-01 00:00:00.000000', '[1]', '[]',
  '[10, 12]', '[1, 1]', 'gdpr', NULL, NULL, '{}', '2025-01-01 00:00:00.000000', '2025-01-01 00:00:00.000000');
INSERT INTO deletion_requests VALUES ('req-000002', 'failed', '2025-01-02 00:00:00.000000', '[2]', '[]',
  '[13]', '[2]', NULL, NULL, NULL, '{}', '2025-01-02 00:00:00.000000', '2025-01-02 00:00:00.000000');
INSERT INTO request_events VALUES (1, 'req-000001', NULL, 'received', '2025-01-01 00:00:00.000000', 'a', NULL);
INSERT INTO request_events VALUES (2, 'req-000002', NULL, 'received', '2025-01-02 00:00:00.000000', 'a', NULL);
"""


def test_a_ledger_from_before_due_dates_opens_migrated_and_keeps_everything(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    ledger = Ledger(f"sqlite:///{path}", deadline_days=30)
    first, second = ledger.get("req-000001"), ledger.get("req-000002")
    assert first.sample_ids == [10, 12] and first.reason == "gdpr" and second.status is Status.failed
    assert first.due_at == T0 + timedelta(days=30)
    assert [e.to_status for e in ledger.events("req-000001")] == ["received"]
    assert ledger.submit(user_ids=[4], samples=SAMPLES).id == "req-000003"  # the sequence continues
    assert [r.id for r in ledger.list(overdue=True)] == ["req-000001", "req-000002"]
    Ledger(f"sqlite:///{path}")  # opening again changes nothing
    assert ledger.get("req-000001").due_at == T0 + timedelta(days=30)


def test_due_dates_and_overdue(ledger):
    late = ledger.submit(user_ids=[1], samples=SAMPLES, received_at=datetime.now(timezone.utc) - timedelta(days=31))
    fresh = ledger.submit(user_ids=[2], samples=SAMPLES)
    assert late.due_at == late.received_at + timedelta(days=30)
    assert [r.id for r in ledger.list(overdue=True)] == [late.id]
    assert [r.id for r in ledger.pending()] == [late.id, fresh.id]  # oldest first
    approve(ledger, late.id)
    assert ledger.list(overdue=True) == []  # deleted in time or not, it is no longer open


def test_transition_many_changes_all_or_none(ledger):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    b = ledger.submit(user_ids=[2], samples=SAMPLES).id
    before = snapshot(ledger)
    for ids, message in [([a, a], "more than once"), ([a, "req-000404"], "no deletion request"),
                         ([a, b], "illegal transition")]:
        if message == "illegal transition":
            ledger.transition(b, "processing")
            before = snapshot(ledger)
        with pytest.raises(LedgerError, match=message):
            ledger.transition_many(ids, "processing")
        assert snapshot(ledger) == before


def test_decide_is_compare_and_set(ledger):
    a = ledger.submit(user_ids=[1], samples=SAMPLES).id
    for status in ("processing", "unlearned"):
        ledger.transition(a, status, model_version="2" if status == "unlearned" else None)
    with pytest.raises(LedgerError, match="reviewer name is required"):
        ledger.decide("m", "2", "approved", "  ", None, [a], [(Status.approved, "ok")])
    with pytest.raises(LedgerError, match="not unlearned into v3"):
        ledger.decide("m", "3", "approved", "alice", None, [a], [(Status.approved, "ok")])
    assert ledger.review("m", "3") is None  # the refused decision left no trace
    ledger.decide("m", "2", "approved", "alice", None, [a], [(Status.approved, "ok")])
    with pytest.raises(LedgerError, match="already approved by alice"):
        ledger.decide("m", "2", "rejected", "bob", "no", [a], [(Status.rejected, "no")])
    assert ledger.get(a).status is Status.approved
