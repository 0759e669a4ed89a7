"""Where the registry's memory lives: a small record file inside each stored model's folder.

Why a file in the model folder and not BentoML labels/metadata: BentoML 1.4 has no public way to change
a stored model's labels or metadata after `bentoml.models.create` (`ModelInfo` is a frozen attrs class;
rewriting model.yaml would go through undocumented internals, `Model.flush`, which write the file in
place, so a crash mid-write could leave a model BentoML can no longer load). A model's folder, on the
other hand, is public (`Model.path`), and `bentoml models export` archives the whole folder while
`import` restores it, so a record written there travels with the model. Each record is replaced
atomically (write a temporary file, then rename), so readers never see half of one and the model's own
files are never touched.

A record holds the model's stage and the serving history of its model name as it stood when the record
was last written. Every change of the served model writes the new production model's record and the
replaced one's, both with the full history, so exporting the served model alone carries its whole
history. The history of a name is the longest history among its models' records (histories only grow,
so the longest is the newest); the production model of a name is the last one that history served.

Writers hold an exclusive lock (fcntl) on a file in the model store, so two processes promoting at once
never lose an entry. The lock is re-entrant within a process. Readers need no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

RECORD = "cxrlt-registry.json"
LEGACY_POINTER = "cxrlt-serving.json"  # the old serving mark beside the store: migrated once
STAGES = ("candidate", "production", "archived")
ACTIONS = ("promote", "rollback", "manual")

_lock = threading.RLock()
_depth = 0
_fd: int | None = None


def now() -> str:
    """UTC, microseconds: entries of one store order by time even within a second."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def read_record(model_dir: str | Path) -> dict:
    p = Path(model_dir) / RECORD
    if not p.exists():  # registered before the registry had memory: a candidate with no history
        return {"stage": "candidate", "history": []}
    rec = json.loads(p.read_text())
    rec.setdefault("stage", "candidate")
    rec.setdefault("history", [])
    return rec


def write_record(model_dir: str | Path, record: dict) -> None:
    p = Path(model_dir) / RECORD
    tmp = p.with_name(f".{RECORD}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(p)  # atomic: a reader sees the old record or the new one, never half of one


@contextlib.contextmanager
def store_lock(store_dir: Path):
    """Exclusive across processes (flock on `<store>/.cxrlt-registry.lock`, a file BentoML's listing
    ignores since it lists folders only) and re-entrant within this process."""
    global _depth, _fd
    with _lock:
        if _depth == 0:
            store_dir.mkdir(parents=True, exist_ok=True)
            _fd = os.open(store_dir / ".cxrlt-registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(_fd, fcntl.LOCK_EX)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                fcntl.flock(_fd, fcntl.LOCK_UN)
                os.close(_fd)
                _fd = None


def newest_history(records: dict[str, dict]) -> list[dict]:
    """The name's history: the longest one its models carry (ties: the latest last entry)."""
    hists = [r["history"] for r in records.values() if r["history"]]
    return max(hists, key=lambda h: (len(h), h[-1]["time"]), default=[])


def served_stack(history: list[dict]) -> list[str]:
    """The models one can roll back through, oldest first, the served one last. Serving a model puts it
    on top (once); rolling back to a model drops everything served after it, so rolling back twice walks
    back two models."""
    stack: list[str] = []
    for e in history:
        tag = e["tag"]
        if e["action"] == "rollback" and tag in stack:
            stack = stack[:stack.index(tag) + 1]
        else:
            stack = [t for t in stack if t != tag] + [tag]
    return stack


def entry(tag: str, action: str, reason: str, previous: str | None, time: str | None = None) -> dict:
    if action not in ACTIONS:
        raise ValueError(f"unknown history action {action!r}: use one of {', '.join(ACTIONS)}")
    return {"tag": tag, "time": time or now(), "action": action, "reason": reason, "previous": previous}


def legacy_entries(pointer: Path) -> dict[str, list[dict]]:
    """The old pointer file's history (all model names in one list), as new entries per model name."""
    old = json.loads(pointer.read_text()).get("history", [])
    by_name: dict[str, list[dict]] = {}
    for e in old:
        name = e["tag"].split(":", 1)[0]
        hist = by_name.setdefault(name, [])
        reason = e.get("reason", "")
        action = ("rollback" if reason.startswith("rollback") else
                  "promote" if reason.startswith("best validation") else "manual")
        hist.append(entry(e["tag"], action, reason, hist[-1]["tag"] if hist else None, _utc(e.get("time"))))
    return by_name


def _utc(t: str | None) -> str:
    if not t:
        return now()
    try:  # the old file wrote local time with a numeric offset (%z)
        d = datetime.strptime(t, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        d = datetime.fromisoformat(t)
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.astimezone(timezone.utc).isoformat(timespec="microseconds")
