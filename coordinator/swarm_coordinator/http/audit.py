"""The gateway's audit log: one JSON line per generation request (``--audit-log FILE``).

Each line::

    {"time": "2026-11-30T18:00:00.123Z", "ts": 1796061600.123, "key": "key-1a2b3c4d",
     "endpoint": "chat.completions", "model": "SmolLM2-135M-Instruct.Q4_1",
     "decision": "allowed" | "refused" | "stopped", "rule": null | "<rule id>",
     "label": null | "<classifier label>", "outcome": "done" | "error" | "cancelled" | "refused",
     "finish_reason": "stop" | "length" | "content_filter" | null,
     "prompt_tokens": 12, "completion_tokens": 30, "prompt_sha256": "<hex>"}

plus ``"prompt"`` (the prompt text, or the chat messages) and ``"completion"`` only with
``--audit-log-text``. ``completion_tokens`` counts the tokens released to the caller. ``key`` is the API key's fingerprint (a SHA-256 prefix, as on the
dashboard; ``anonymous`` when the API is open), never the key. ``prompt_sha256`` hashes
the prompt as the gateway received it (the string, the token ids, or the messages as
canonical JSON), so an operator holding a prompt can find its line.

Invariants: the event loop never writes to disk. :meth:`AuditLog.write` puts the line
on a bounded queue (``MAX_PENDING``) that one writer thread drains, appending and
flushing after each burst; when the disk is so slow that the queue is full, the line is
dropped, counted (``dropped``, and ``swarm_gateway_audit_dropped_total``) and logged
once per burst, so a slow disk can never stall or grow the gateway. ``reopen()`` (on
SIGHUP) reopens the file, for log rotation. ``close()`` writes what is queued and stops
the thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = ["AuditLog", "prompt_hash"]

MAX_PENDING = 10_000
_REOPEN = object()
_STOP = object()


def prompt_hash(prompt: Any) -> str:
    """SHA-256 of a prompt: a string as UTF-8, anything else as canonical JSON."""
    data = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


class AuditLog:
    """Append-only JSON lines written by a thread from a bounded queue."""

    def __init__(self, path: str | Path, *, include_text: bool = False, on_drop: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.include_text = include_text
        self.dropped = 0
        self._on_drop = on_drop
        self._queue: queue.Queue[Any] = queue.Queue(MAX_PENDING)
        self._file: IO[str] = self._open()  # fail at start, not at the first request
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Queue one line (never blocks); text fields are dropped unless asked for."""
        if not self.include_text:
            record = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
        now = time.time()
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z", "ts": round(now, 3)}
        line.update(record)
        try:
            self._queue.put_nowait(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit log %s: the disk is too slow, %d lines dropped so far", self.path, self.dropped)

    def reopen(self) -> None:
        """Reopen the file (after a log rotation moved it away)."""
        try:
            self._queue.put_nowait(_REOPEN)
        except queue.Full:
            log.warning("audit log %s: queue full, reopen skipped", self.path)

    def drain(self) -> None:
        """Wait until every queued line is written and flushed (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            taken = 1
            try:
                while True:  # a burst: write everything queued, then flush once
                    if item is _STOP:
                        self._file.flush()
                        self._file.close()
                        return
                    if item is _REOPEN:
                        self._file.close()
                        self._file = self._open()
                    else:
                        self._file.write(item + "\n")
                    try:
                        item = self._queue.get_nowait()
                        taken += 1
                    except queue.Empty:
                        break
                self._file.flush()
            except OSError as exc:
                log.error("audit log %s: write failed: %s", self.path, exc)
            finally:
                for _ in range(taken):
                    self._queue.task_done()
