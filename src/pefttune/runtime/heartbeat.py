"""The driver's heartbeat: ``<study>/heartbeat.json``, so `pefttune status` knows whether the driver lives.

While a study runs, :class:`Heartbeat` keeps one small JSON file in the study folder up to date:

``pid``, ``host``     the driver's process id and ``socket.gethostname()``;
``started``           when the driver entered the heartbeat (epoch seconds);
``updated``           refreshed every ``interval`` seconds (default 2) by a daemon thread, and at
                      every change; after the end, the time of the end;
``stage``             the current stage, ``stage_started`` when it began;
``stages``            the stages done so far, each ``{name, started, ended}``;
``state``             ``running``, ``finished`` (clean exit), ``failed`` (an exception) or
                      ``interrupted`` (KeyboardInterrupt / SystemExit);
``pid_start``         the process's start time in clock ticks since boot (Linux; else null), so a
                      process id reused by another process is not mistaken for the driver.

The file is replaced atomically (a temporary file in the same folder, then ``os.replace``), so a
reader never sees half of it. On an exception the traceback is appended to ``<study>/errors.log``
and :class:`StageFailed` (naming the stage and the log) is raised from it.

:func:`driver_alive` is the liveness rule: on the driver's host, the process ``pid`` exists (and is
not a zombie) and the state is ``running``; on another host, where a process id means nothing,
the file was refreshed within ``stale_after`` seconds (default 15) and the state is ``running``.

A study on remote storage (a URI other than ``file://``) gets no heartbeat file: :class:`Heartbeat`
then only keeps the stage and still turns exceptions into :class:`StageFailed`.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pefttune.runtime.storage import read_storage_text, write_storage_text

HEARTBEAT_FILE = "heartbeat.json"
ERRORS_LOG = "errors.log"  # the same log the console writes trial tracebacks to
STATES = ("running", "finished", "failed", "interrupted")


class StageFailed(RuntimeError):
    """The driver failed in ``stage``; the full traceback is in ``log_path``.

    Raised ``from`` the original exception; ``error`` is its one-line form
    (``ValueError: ...``), taken from the cause when not given.
    """

    def __init__(self, stage: str, log_path: str | os.PathLike | None, error: str | None = None):
        super().__init__(stage, log_path)
        self.stage = stage
        self.log_path = None if log_path is None else str(log_path)
        self._error = error

    #: The one-line error is clipped to this many characters (the log has all of it).
    MAX_ERROR = 300

    @property
    def error(self) -> str:
        """``Type: message`` of the cause on one line (newlines folded), clipped to :attr:`MAX_ERROR`."""
        if self._error:
            text = " ".join(str(self._error).split())
        else:
            cause = self.__cause__ or self.__context__
            if cause is None:
                return "unknown error"
            message = " ".join(str(cause).split())
            text = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
        return text if len(text) <= self.MAX_ERROR else text[: self.MAX_ERROR - 3] + "..."

    def __str__(self) -> str:
        where = f" (traceback: {self.log_path})" if self.log_path else ""
        return f"the study failed in stage {self.stage}: {self.error}{where}"


@dataclass
class HeartbeatRecord:
    """What ``heartbeat.json`` holds (see the module docstring)."""

    pid: int
    host: str
    started: float
    updated: float
    stage: str | None = None
    stage_started: float | None = None
    stages: list[dict] = field(default_factory=list)
    state: str = "running"
    pid_start: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "HeartbeatRecord":
        return cls(
            pid=int(data["pid"]),
            host=str(data.get("host") or ""),
            started=float(data["started"]),
            updated=float(data.get("updated") or data["started"]),
            stage=None if data.get("stage") is None else str(data["stage"]),
            stage_started=None if data.get("stage_started") is None else float(data["stage_started"]),
            stages=[s for s in (data.get("stages") or []) if isinstance(s, dict)],
            state=str(data.get("state") or "running"),
            pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
        )


def _local_dir(study_dir) -> Path | None:
    """The study folder as a local path; None for remote storage."""
    text = str(study_dir)
    if "://" in text and not text.startswith("file://"):
        return None
    return Path(os.path.expanduser(text.removeprefix("file://")))


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _process_state(pid: int) -> str | None:
    """One-letter state of process ``pid`` (Linux /proc: R, S, Z, ...), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_exists(pid: int, start: int | None = None) -> bool:
    """Process ``pid`` runs (a zombie does not; with ``start``, it must be the process that started then)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    except OSError:
        return False
    if _process_state(pid) == "Z":
        return False
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:  # the id was reused by a later process
            return False
    return True


def driver_alive(record: HeartbeatRecord, now: float | None = None, stale_after: float = 15.0) -> bool:
    """Whether the driver that writes ``record`` still runs (see the module docstring)."""
    if record.state != "running":
        return False
    if record.host == socket.gethostname():
        return pid_exists(record.pid, record.pid_start)
    now = time.time() if now is None else now
    return now - record.updated <= stale_after


def read_heartbeat(study_dir) -> HeartbeatRecord | None:
    """The heartbeat of the study folder ``study_dir`` (local path or URI); None when it has none
    or the file cannot be read."""
    local = _local_dir(study_dir)
    try:
        if local is not None:
            text = (local / HEARTBEAT_FILE).read_text(encoding="utf-8")
        else:
            text = read_storage_text(f"{str(study_dir).rstrip('/')}/{HEARTBEAT_FILE}")
            if text is None:
                return None
        return HeartbeatRecord.from_dict(json.loads(text))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Heartbeat:
    """Context manager of the driver: ``with Heartbeat(study_dir) as beat: beat.stage("discrete") ...``

    ``interval``: seconds between refreshes of ``updated`` by the daemon thread.
    """

    def __init__(self, study_dir, interval: float = 2.0):
        self.study_dir = study_dir
        self.interval = float(interval)
        self.folder = _local_dir(study_dir)
        self.path = None if self.folder is None else self.folder / HEARTBEAT_FILE
        self.log_path = (self.folder / ERRORS_LOG) if self.folder is not None \
            else f"{str(study_dir).rstrip('/')}/{ERRORS_LOG}"
        now = time.time()
        self.record = HeartbeatRecord(pid=os.getpid(), host=socket.gethostname(), started=now, updated=now,
                                      pid_start=_process_start(os.getpid()))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the driver's calls ----------------------------------------------------------------------
    def __enter__(self) -> "Heartbeat":
        now = time.time()
        with self._lock:
            self.record.started = self.record.updated = now
            self.record.state = "running"
        self._write()
        if self.path is not None:
            self._thread = threading.Thread(target=self._beat, name="pefttune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stage(self, name: str) -> None:
        """Enter stage ``name``: the previous one (if any) is recorded as done."""
        now = time.time()
        with self._lock:
            self._close_stage(now)
            self.record.stage, self.record.stage_started = str(name), now
            self.record.updated = now
        self._write()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 2 * self.interval))
        if exc_type is None:
            state = "finished"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            state = "interrupted"
        else:
            state = "failed"
        now = time.time()
        with self._lock:
            stage = self.record.stage or "start"
            if state == "finished":
                self._close_stage(now)
            self.record.state, self.record.updated = state, now
        self._write()
        if state != "failed":
            return False  # finished: nothing to raise; interrupted: re-raised as is
        if isinstance(exc, StageFailed):  # already reported by an inner heartbeat
            return False
        self._log_traceback(stage, exc_type, exc, tb)
        raise StageFailed(stage, self.log_path) from exc

    # -- inside ------------------------------------------------------------------------------------
    def _close_stage(self, now: float) -> None:
        if self.record.stage is not None:
            self.record.stages.append({"name": self.record.stage, "started": self.record.stage_started,
                                       "ended": now})
            self.record.stage, self.record.stage_started = None, None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self.record.updated = time.time()
            self._write()

    def _write(self) -> None:
        """Replace heartbeat.json atomically; a failed write never fails the study."""
        if self.path is None:
            return
        with self._lock:
            text = json.dumps(asdict(self.record), indent=1)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{HEARTBEAT_FILE}.", suffix=".tmp", dir=self.folder)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        handle.write(text)
                    os.replace(tmp, self.path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            except OSError:
                pass

    def _log_traceback(self, stage: str, exc_type, exc, tb) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(traceback.format_exception(exc_type, exc, tb)).rstrip()
        entry = f"=== {stamp} [{stage}] the driver failed\n{text}\n\n"
        try:
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as handle:
                    handle.write(entry)
            else:
                write_storage_text(str(self.log_path), (read_storage_text(str(self.log_path)) or "") + entry)
        except Exception:  # noqa: BLE001 - the log must not hide the study's own error
            pass
