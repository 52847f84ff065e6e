import sqlite3

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from sandbox.protocol import Stage


def make_candidate(index: int, status: Status = Status.PENDING) -> Candidate:
    return Candidate(
        id=f"g001-a{index:02d}",
        generation=1,
        attempt=index,
        origin=Origin.PROPOSER,
        name=f"loss_{index}",
        code="def f(): pass\n",
        status=status,
    )


def test_archive_round_trip(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    candidate = archive.insert(make_candidate(1))
    candidate.status = Status.REJECTED
    candidate.stage = Stage.UNIT_TEST
    candidate.reason = "output shape torch.Size([]) != (B,)"
    candidate.metrics = {"probe": [0.1, 0.2]}
    candidate.timings = {"unit_test_s": 1.5}
    archive.update(candidate)

    loaded = Archive(tmp_path / "archive.sqlite", read_only=True).get("g001-a01")
    assert loaded.status is Status.REJECTED
    assert loaded.stage is Stage.UNIT_TEST
    assert loaded.reason == candidate.reason
    assert loaded.metrics == {"probe": [0.1, 0.2]}
    assert loaded.timings == {"unit_test_s": 1.5}
    assert loaded.origin is Origin.PROPOSER


def test_archive_writes_are_committed_immediately(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    archive.insert(make_candidate(1))
    # a second connection sees the row at once, as a resumed process would after SIGKILL
    other = sqlite3.connect(tmp_path / "archive.sqlite")
    assert other.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 1


def test_archive_unfinished_excludes_final(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    archive.insert(make_candidate(1, Status.EVALUATED))
    archive.insert(make_candidate(2, Status.TRAINING))
    archive.insert(make_candidate(3, Status.REJECTED))
    archive.insert(make_candidate(4, Status.PENDING))
    assert [c.id for c in archive.unfinished()] == ["g001-a02", "g001-a04"]


def test_fingerprint_lookup_ignores_unjudged(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    pending = make_candidate(1, Status.PENDING)
    pending.fingerprint = "abc"
    archive.insert(pending)
    assert archive.find_by_fingerprint("abc") is None
    judged = make_candidate(2, Status.EVALUATED)
    judged.fingerprint = "abc"
    archive.insert(judged)
    assert archive.find_by_fingerprint("abc").id == "g001-a02"


def test_meta_and_llm_totals(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    archive.set_meta("completed_generations", 3)
    assert archive.get_meta("completed_generations") == 3
    archive.record_llm_call(generation=1, attempt=1, model="m", prompt_tokens=10, completion_tokens=5)
    archive.record_llm_call(generation=1, attempt=2, model="m", prompt_tokens=7, completion_tokens=2, retries=2)
    totals = archive.llm_totals()
    assert totals["calls"] == 2
    assert totals["prompt_tokens"] == 17
    assert totals["completion_tokens"] == 7
    assert totals["retries"] == 2
