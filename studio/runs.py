"""Runs: a folder each under <workspace>/runs/, indexed in a SQLite database.

The folder is the truth: config.yaml, events.jsonl (every status change is an event there too),
log.txt, checkpoints/, adapter/, data/. The database is an index for listing and for the queue;
`Registry.rebuild()` recreates it from the folders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import sys
import time
from collections import Counter
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from pipelines import MODALITIES, config_from_dict, load_config
from pipelines.config import ConfigError, RunConfig
from pipelines.hub import workspace

# queued: waiting for a free slot; starting: worker launched; running: training.
# The rest are final, except that stopped and interrupted runs can be resumed.
ACTIVE = ("queued", "starting", "running")
FINAL = ("completed", "stopped", "failed", "cancelled", "interrupted")
RESUMABLE = ("stopped", "interrupted", "failed")

# How studio.worker tells a failure; here, free of torch, for the tabs to judge a failure as the CLI does.
OUT_OF_MEMORY = "The run ran out of memory."
DISK_FULL = "The disk is full, so a checkpoint could not be written (earlier checkpoints are intact)."
UNEXPECTED = "Training stopped on an unexpected error"
ENDED = "A training process ended unexpectedly"
# Failures a resume, with the run's settings unchanged, may get past: memory or disk that other work held, a
# crash. The others are TrainingFailures (the settings, the data, the base model, a loss gone to nan), which
# a resume meets again.
RETRYABLE = (OUT_OF_MEMORY, DISK_FULL, UNEXPECTED, ENDED)


def resume_may_help(status: str, error: str) -> bool:
    """Whether to offer a resume for a run that ended so (a multi-process run's error names its process): the
    CLI suggests one and the tabs' Resume button is enabled only then."""
    return status in ("stopped", "interrupted") or (status == "failed" and any(c in error for c in RETRYABLE))

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    modality TEXT NOT NULL,
    base_model TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    resume INTEGER NOT NULL DEFAULT 0,
    queued_at REAL,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    config_hash TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    advice TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


@dataclass
class Run:
    id: str
    name: str
    modality: str
    base_model: str
    status: str
    pid: int | None
    resume: int
    queued_at: float | None
    created: float
    started: float | None
    ended: float | None
    config_hash: str
    error: str
    advice: str

    @property
    def dir(self) -> Path:
        return runs_root() / self.id

    def config(self) -> RunConfig:
        return load_config(self.dir / "config.yaml")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"dir": str(self.dir)}


def runs_root() -> Path:
    return workspace() / "runs"


def valid_run_id(run_id: str) -> bool:
    """Run ids come from users (URLs, CLI): only our own shape is accepted, so an id never becomes a path
    outside the runs folder."""
    return bool(run_id) and len(run_id) < 80 and all(c.isalnum() or c == "-" for c in run_id)


class Registry:
    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home else workspace()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "runs").mkdir(exist_ok=True)
        self.db_path = self.home / "studio.db"
        self._sql(SCHEMA, script=True)

    def _sql(self, query: str, args: list | tuple = (), *, script: bool = False) -> Any:
        """One statement: the rows it returns, or for a change the number of rows changed."""
        def statement(db: sqlite3.Connection) -> Any:
            if script:
                return db.executescript(query)
            cursor = db.execute(query, args)
            return cursor.fetchall() if cursor.description else cursor.rowcount
        return self._with_db(statement)

    def _with_db(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """`work` on a connection of its own. A damaged studio.db (overwritten, a disk fault) is replaced by an
        index rebuilt from the run folders, which hold the truth, and the work runs again: the documented way
        out used to fail on the damaged file itself, and every page, command and worker with it."""
        for attempt in (1, 2):
            try:
                with self._db() as db:
                    return work(db)
            except sqlite3.DatabaseError as err:
                if attempt == 2 or not damaged(err):
                    raise
                self._replace_damaged(err)

    def _replace_damaged(self, err: sqlite3.DatabaseError) -> None:
        """Set the damaged index aside and put one rebuilt from the folders in its place, whole: an index
        that was empty while being filled once lost a run's end ('stopped' changed no row, then the rebuild
        wrote back 'running'). One process does it; the others that met the damage wait and find it mended."""
        with open(self.db_path.with_name("studio.db.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if readable(self.db_path):
                return
            kept = self.db_path.with_name(f"studio.db.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            fresh = self.db_path.with_name("studio.db.rebuilding")
            fresh.unlink(missing_ok=True)  # left by a process that died building it
            with closing(sqlite3.connect(fresh, isolation_level=None)) as db:
                db.executescript(SCHEMA)
                found = self._index_folders(db)
            # The damaged file's journal first: replayed into the new index, it would damage that too.
            for suffix in ("-wal", "-shm"):
                with suppress(FileNotFoundError):
                    os.replace(f"{self.db_path}{suffix}", f"{kept}{suffix}")
            try:
                os.link(self.db_path, kept)  # kept for whoever wants to look into it ...
            except OSError:  # a file system without hard links
                shutil.copyfile(self.db_path, kept)
            os.replace(fresh, self.db_path)  # ... and replaced in one step: never missing, never half-filled
        print(f"studio.db could not be read ({err}): it was set aside as {kept.name}, and the index of runs was "
              f"rebuilt from the {found} run folders.", file=sys.stderr)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short connection per operation: safe across Gradio's threads and the worker processes.
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    # ---- creating ----------------------------------------------------------------------------

    def create(self, config: RunConfig, status: str = "queued") -> Run:
        """A new run folder with its own copy of the data and a complete, replayable config.yaml."""
        config.check()
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.modality}-{secrets.token_hex(2)}"
        run_dir = self.home / "runs" / run_id
        run_dir.mkdir(parents=True)
        try:
            config = _copy_data_into(config, run_dir)
        except BaseException:  # a file gone meanwhile, a full disk: no half-made run folder stays behind
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        name = config.name.strip() or f"{config.modality} run {time.strftime('%m-%d %H.%M.%S')}"

        def insert(db: sqlite3.Connection) -> None:
            # The name picked and the row that takes it in one write transaction: two Trains of one name at
            # once both found it free, and both runs were given it.
            db.execute("BEGIN IMMEDIATE")
            named = config.changed(name=self._unused_name(db, name))
            named.check()
            named.save(run_dir / "config.yaml")
            now = time.time()
            append_event(run_dir, "status", status=status)  # first: a rebuild made meanwhile finds the run queued
            db.execute("INSERT OR REPLACE INTO runs (id, name, modality, base_model, status, created, queued_at, "
                       "config_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (run_id, named.name, named.modality, named.base_model, status, now,
                        now if status == "queued" else None, config_hash(named)))
            db.execute("COMMIT")
        self._with_db(insert)
        return self.get(run_id)

    # ---- reading -----------------------------------------------------------------------------

    def get(self, run_id: str) -> Run | None:
        if not valid_run_id(run_id):
            return None
        rows = self._sql("SELECT * FROM runs WHERE id = ?", (run_id,))
        return Run(**dict(rows[0])) if rows else None

    def list(self, modality: str | None = None, status: str | None = None) -> list[Run]:
        query, args = "SELECT * FROM runs WHERE 1=1", []
        if modality:
            query, args = query + " AND modality = ?", args + [modality]
        if status:
            query, args = query + " AND status = ?", args + [status]
        return [Run(**dict(r)) for r in self._sql(query + " ORDER BY created DESC", args)]

    def queue(self) -> list[Run]:
        """Queued runs in the order they will start."""
        rows = self._sql("SELECT * FROM runs WHERE status = 'queued' ORDER BY queued_at, created")
        return [Run(**dict(r)) for r in rows]

    def queue_position(self, run_id: str) -> int:
        """1 for the next run to start; 0 for a run not queued."""
        ids = [r.id for r in self.queue()]
        return ids.index(run_id) + 1 if run_id in ids else 0

    # ---- changing ----------------------------------------------------------------------------

    def set_status(self, run_id: str, status: str, *, expect: tuple[str, ...] | None = None,
                   **values: Any) -> bool:
        """Change a run's status (and any columns given), logging it as an event in the run folder.
        With `expect`, only if the current status is one of those: an atomic claim, so two processes
        can never both start the same queued run. Returns whether the change happened."""
        columns = {"status": status, **values}
        if status in FINAL:
            columns.setdefault("ended", time.time())
        sets = ", ".join(f"{k} = ?" for k in columns)
        query, args = f"UPDATE runs SET {sets} WHERE id = ?", list(columns.values()) + [run_id]
        if expect:
            query += f" AND status IN ({', '.join('?' * len(expect))})"
            args += list(expect)
        extra = {k: v for k, v in values.items()  # (resume: a rebuild keeps a queued resume a resume)
                 if k in ("error", "advice", "pid", "resume") and v not in (None, "", 0)}

        def change(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")  # the row and the folder's event together, as a rebuild reads them
            changed = db.execute(query, args).rowcount == 1
            if changed:
                append_event(self.home / "runs" / run_id, "status", status=status, **extra)
            db.execute("COMMIT")
            return changed
        return self._with_db(change)

    @staticmethod
    def _unused_name(db: sqlite3.Connection, name: str, run_id: str = "") -> str:
        """`name`, or `name 2`, `name 3`… where another run has it: runs compared side by side, or picked in
        a list, need names apart. Read inside the write transaction that gives the name, so none is given twice."""
        taken = {row["name"] for row in db.execute("SELECT name FROM runs WHERE id != ?", (run_id,))}
        found, n = name, 2
        while found in taken:
            found, n = f"{name[:79 - len(str(n))].rstrip()} {n}", n + 1
        return found

    def rename(self, run_id: str, name: str) -> None:
        run = self.get(run_id)
        config = run.config().changed(name=name.strip())
        config.check()

        def change(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")  # as in create: two renames to one name at once were both let through
            if self._unused_name(db, config.name, run_id) != config.name:
                raise ConfigError([("name", "is already another run's name")])
            _save_config(run.dir, config)
            db.execute("UPDATE runs SET name = ? WHERE id = ?", (config.name, run_id))
            db.execute("COMMIT")
        self._with_db(change)

    def delete(self, run_id: str) -> None:
        run = self.get(run_id)
        if run is None:
            return
        if run.status in ("starting", "running"):
            raise ValueError(f"Run {run_id} is {run.status}: stop or cancel it before deleting it.")
        shutil.rmtree(run.dir, ignore_errors=True)
        self.forget(run_id)

    def forget(self, run_id: str) -> None:
        """Drop a run from the index (its folder is gone)."""
        self._sql("DELETE FROM runs WHERE id = ?", (run_id,))

    def rebuild(self) -> int:
        """Re-create the index from the run folders (after losing or corrupting studio.db). Returns the number
        of runs found."""
        return self._with_db(self._index_folders)

    def _index_folders(self, db: sqlite3.Connection) -> int:
        # The folders are read under the write lock, as set_status changes a row and its folder together:
        # a status changed meanwhile is either in both or in neither.
        db.execute("BEGIN IMMEDIATE")  # and one change: no reader sees the index empty halfway
        rows = [row for row in map(_row_from_folder, sorted((self.home / "runs").iterdir())) if row]
        db.execute("DELETE FROM runs")
        for row in rows:
            db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       list(row.values()))
        db.execute("COMMIT")
        return len(rows)


def readable(db_path: Path) -> bool:
    """Whether the index is sound now (another process may have mended it); busy is not damaged."""
    try:
        with closing(sqlite3.connect(db_path, timeout=30)) as db:
            return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError as err:
        return not damaged(err)


def damaged(err: sqlite3.DatabaseError) -> bool:
    """Whether SQLite found the file damaged ("file is not a database", "database disk image is malformed"):
    those are plain DatabaseErrors; its subclasses are a locked file, a broken constraint, a wrong query."""
    return type(err) is sqlite3.DatabaseError


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def append_event(run_dir: Path, kind: str, **data: Any) -> None:
    """One event from outside the training process (queueing, cancel, interruption)."""
    if not run_dir.is_dir():
        return
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": kind, "time": round(time.time(), 3), **data}) + "\n")


def _save_config(run_dir: Path, config: RunConfig) -> None:
    tmp = run_dir / "config.yaml.tmp"
    config.save(tmp)
    os.replace(tmp, run_dir / "config.yaml")


def _copy_data_into(config: RunConfig, run_dir: Path) -> RunConfig:
    """Copy every data file the config names into run_dir/data/ and point the config at the copies
    (relative paths), so the run folder alone replays the run, even after uploads are cleaned up."""
    data_dir = run_dir / "data"
    changes: dict[str, Any] = {}
    names = Counter(_source(raw).name.lower() for field in config.path_fields
                    for raw in _listed(getattr(config, field)) if raw)
    shared = 0  # folders made for files of one name
    for name in config.path_fields:
        value = getattr(config, name)
        copied = []
        for raw in _listed(value):
            if not raw:
                copied.append(raw)
                continue
            source = _source(raw)
            if not source.exists():
                raise FileNotFoundError(f"{name}: {source} does not exist")
            # Each keeps its name, which a caption or transcript table may name ('clip (1).wav', 'café.png'):
            # renamed, it dropped out of the run that the check had passed it for. Files of one name (uploaded
            # from two folders) each go into a folder of their own, as Gradio keeps them, named by no other.
            target_name = source.name
            if names[source.name.lower()] > 1:
                shared += 1
                while f"same-name-{shared}" in names:
                    shared += 1
                target_name = f"same-name-{shared}/{source.name}"
            target = data_dir / target_name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, symlinks=False)
            else:
                shutil.copy2(source, target)
            copied.append(f"data/{target_name}")
        changes[name] = copied if isinstance(value, list) else copied[0]
    return config.changed(**changes)


def _listed(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _source(raw: str) -> Path:
    """A data path as given, or made whole where its name is none ('data/..', '/')."""
    return Path(raw).resolve() if Path(raw).name in ("", "..") else Path(raw)


def _row_from_folder(run_dir: Path) -> dict[str, Any] | None:
    config_file = run_dir / "config.yaml"
    if not (run_dir.is_dir() and valid_run_id(run_dir.name) and config_file.exists()):
        return None
    try:
        config = config_from_dict(yaml.safe_load(config_file.read_text()), base=run_dir)
    except Exception:
        return None
    status, pid, error, advice, resume = "interrupted", None, "", "", 0
    created = started = ended = queued_at = None
    events_file = run_dir / "events.jsonl"
    if events_file.exists():
        for line in events_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            created = created or event.get("time")
            if event.get("type") == "status":
                status = event["status"]
                pid = event.get("pid", pid)
                error, advice = event.get("error", ""), event.get("advice", "")
                if status == "running":
                    started = event.get("time")
                if status == "queued":
                    queued_at, resume = event.get("time"), event.get("resume", 0)
                if status in FINAL:
                    ended = event.get("time")
    if config.modality not in MODALITIES:
        return None
    resume = resume if status == "queued" else 0  # (a worker that starts the run resets it)
    return {"id": run_dir.name, "name": config.name, "modality": config.modality, "base_model": config.base_model,
            "status": status, "pid": pid, "resume": resume, "queued_at": queued_at,
            "created": created or config_file.stat().st_mtime, "started": started, "ended": ended,
            "config_hash": config_hash(config), "error": error, "advice": advice}
