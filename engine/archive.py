"""Durable SQLite archive of a run: settings, every candidate and every LLM call.

Each write is its own transaction with synchronous=FULL in WAL mode, so a run
killed at any point (SIGKILL included) keeps everything written before it.
"""

from __future__ import annotations

import json
import functools
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from engine.candidate import Candidate, Origin, Status
from sandbox.protocol import Stage

ARCHIVE_FILE = "archive.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    generation INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    origin TEXT NOT NULL,
    name TEXT NOT NULL,
    code TEXT NOT NULL,
    thought TEXT NOT NULL DEFAULT '',
    reply TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    stage TEXT,
    category TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    feedback TEXT NOT NULL DEFAULT '',
    fitness REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    fingerprint TEXT NOT NULL DEFAULT '',
    behaviour_fingerprint TEXT NOT NULL DEFAULT '',
    duplicate_of TEXT NOT NULL DEFAULT '',
    context_ids TEXT NOT NULL DEFAULT '[]',
    timings TEXT NOT NULL DEFAULT '{}',
    log_tail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS candidates_generation ON candidates(generation);
CREATE INDEX IF NOT EXISTS candidates_fingerprint ON candidates(fingerprint);
CREATE TABLE IF NOT EXISTS llm_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    generation INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    candidate_id TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    requests INTEGER NOT NULL DEFAULT 1,
    served_model TEXT NOT NULL DEFAULT '',
    temperature REAL,
    retry_errors TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

_JSON_FIELDS = ("metrics", "context_ids", "timings")

# llm_calls columns added after the first schema, with the definition that
# adds them to an older archive: HTTP requests sent for the call (1 + retries),
# the model name the endpoint reported, the sampling temperature and a JSON
# list describing each failed request.
_LLM_CALL_COLUMNS = {
    "requests": "INTEGER NOT NULL DEFAULT 1",
    "served_model": "TEXT NOT NULL DEFAULT ''",
    "temperature": "REAL",
    "retry_errors": "TEXT NOT NULL DEFAULT '[]'",
}


def _locked(method):
    """Serialize a method on the archive's lock; concurrent evaluations share one connection."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Archive:
    """Reads and writes one run's SQLite archive; safe to share between threads."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"no archive at {self.path}: is this a run directory made by `evolve`?")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._add_llm_call_columns()
            self._db.commit()
            if self.get_meta("schema_version") is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
        self._db.row_factory = sqlite3.Row

    @classmethod
    def open_run(cls, run_dir: Path, read_only: bool = True) -> Archive:
        return cls(Path(run_dir) / ARCHIVE_FILE, read_only=read_only)

    @_locked
    def close(self) -> None:
        self._db.close()

    # run metadata

    @_locked
    def set_meta(self, key: str, value: Any) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO run(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )

    @_locked
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM run WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    @_locked
    def log_event(self, kind: str, detail: dict[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO events(kind, detail, created_at) VALUES(?, ?, ?)",
                (kind, json.dumps(detail, default=str), time.time()),
            )

    @_locked
    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT kind, detail, created_at FROM events"
        rows = self._db.execute(query + (" WHERE kind=?" if kind else "") + " ORDER BY id", (kind,) if kind else ())
        return [{"kind": r["kind"], "detail": json.loads(r["detail"]), "created_at": r["created_at"]} for r in rows]

    # candidates

    @_locked
    def insert(self, candidate: Candidate) -> Candidate:
        now = time.time()
        candidate.created_at = candidate.updated_at = now
        row = self._row_values(candidate)
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._db:
            cursor = self._db.execute(f"INSERT INTO candidates({columns}) VALUES({marks})", tuple(row.values()))
        candidate.seq = cursor.lastrowid
        return candidate

    @_locked
    def update(self, candidate: Candidate) -> None:
        candidate.updated_at = time.time()
        row = self._row_values(candidate)
        row.pop("id")
        assignments = ", ".join(f"{column}=?" for column in row)
        with self._db:
            self._db.execute(f"UPDATE candidates SET {assignments} WHERE id=?", (*row.values(), candidate.id))

    @_locked
    def get(self, candidate_id: str) -> Candidate | None:
        row = self._db.execute("SELECT * FROM candidates WHERE id=?", (candidate_id,)).fetchone()
        return None if row is None else _candidate_from_row(row)

    @_locked
    def candidates(self, where: str = "", params: tuple = ()) -> list[Candidate]:
        query = "SELECT * FROM candidates" + (f" WHERE {where}" if where else "") + " ORDER BY seq"
        return [_candidate_from_row(row) for row in self._db.execute(query, params)]

    def iter_proposals(self) -> Iterator[Candidate]:
        yield from self.candidates("origin=?", (Origin.PROPOSER.value,))

    @_locked
    def seeds(self) -> list[Candidate]:
        return self.candidates("origin=?", (Origin.SEED.value,))

    @_locked
    def unfinished(self) -> list[Candidate]:
        finals = tuple(s.value for s in Status if s.is_final)
        marks = ", ".join("?" for _ in finals)
        return self.candidates(f"status NOT IN ({marks})", finals)

    @_locked
    def find_by_fingerprint(self, fingerprint: str, column: str = "fingerprint") -> Candidate | None:
        """Return the earliest judged candidate with this fingerprint, or None."""
        if column not in ("fingerprint", "behaviour_fingerprint") or not fingerprint:
            return None
        row = self._db.execute(
            f"SELECT * FROM candidates WHERE {column}=? AND status IN (?, ?) ORDER BY seq LIMIT 1",
            (fingerprint, Status.EVALUATED.value, Status.REJECTED.value),
        ).fetchone()
        return None if row is None else _candidate_from_row(row)

    @_locked
    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]

    def next_candidate_id(self, generation: int, attempt: int) -> str:
        return f"g{generation:03d}-a{attempt:02d}"

    # LLM calls

    @_locked
    def record_llm_call(self, **fields: Any) -> None:
        fields.setdefault("created_at", time.time())
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self._db:
            self._db.execute(f"INSERT INTO llm_calls({columns}) VALUES({marks})", tuple(fields.values()))

    @_locked
    def llm_calls(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._db.execute("SELECT * FROM llm_calls ORDER BY id")]

    @_locked
    def llm_totals(self) -> dict[str, float]:
        """Return the run's LLM totals; a call with an error produced no candidate."""
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
            "COALESCE(SUM(cost_usd),0), COALESCE(SUM(retries),0), COALESCE(SUM(requests),0), "
            "COALESCE(SUM(error != ''),0) FROM llm_calls"
        ).fetchone()
        return {
            "calls": row[0],
            "prompt_tokens": row[1],
            "completion_tokens": row[2],
            "cost_usd": row[3],
            "retries": row[4],
            "requests": row[5],
            "failed_calls": row[6],
        }

    def _add_llm_call_columns(self) -> None:
        present = {row[1] for row in self._db.execute("PRAGMA table_info(llm_calls)")}
        for column, definition in _LLM_CALL_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE llm_calls ADD COLUMN {column} {definition}")
                if column == "requests":
                    self._db.execute("UPDATE llm_calls SET requests = retries + 1")

    @staticmethod
    def _row_values(candidate: Candidate) -> dict[str, Any]:
        return {
            "id": candidate.id,
            "generation": candidate.generation,
            "attempt": candidate.attempt,
            "origin": candidate.origin.value,
            "name": candidate.name,
            "code": candidate.code,
            "thought": candidate.thought,
            "reply": candidate.reply,
            "model": candidate.model,
            "status": candidate.status.value,
            "stage": candidate.stage.value if candidate.stage else None,
            "category": candidate.category,
            "reason": candidate.reason,
            "feedback": candidate.feedback,
            "fitness": candidate.fitness,
            "metrics": json.dumps(candidate.metrics, default=str),
            "fingerprint": candidate.fingerprint,
            "behaviour_fingerprint": candidate.behaviour_fingerprint,
            "duplicate_of": candidate.duplicate_of,
            "context_ids": json.dumps(candidate.context_ids),
            "timings": json.dumps(candidate.timings),
            "log_tail": candidate.log_tail,
            "created_at": candidate.created_at,
            "updated_at": candidate.updated_at,
        }


def _candidate_from_row(row: sqlite3.Row) -> Candidate:
    values = dict(row)
    for name in _JSON_FIELDS:
        values[name] = json.loads(values[name])
    values["origin"] = Origin(values["origin"])
    values["status"] = Status(values["status"])
    values["stage"] = Stage(values["stage"]) if values["stage"] else None
    return Candidate(**values)
