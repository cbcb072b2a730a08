"""The policy at work in a gateway: the live rules, their reloads, and every decision's record.

:class:`PolicyGate` holds the current :class:`~.policy.Policy` (empty without
``--policy``), decides on prompts (:meth:`check_prompt`, which raises the OpenAI-shaped
400 ``content_policy_violation``) and filters completions (:meth:`push`), and records
each request's decision three ways: ``/metrics`` (``swarm_gateway_policy_decisions_total``
by decision and rule: a label set bounded by the rule ids of the files loaded), the
audit log (:mod:`.audit`, when asked) and the dashboard (recent policy events, refusals
per API key).

Invariants:

- Reload never leaves the gateway without rules: :meth:`reload` (SIGHUP, or the file
  watch noticing a new modification time, size or inode) builds a new policy and swaps
  it in whole; a broken file is logged at ERROR, shown on the dashboard, counted
  (``swarm_gateway_policy_reloads_total{result="error"}``) and the old rules stay. A
  generation keeps the policy it started with.
- Operator code (classifiers) never runs on the event loop: checks go through a worker
  thread when the policy has a classifier.
- The dashboard's maps are bounded: ``MAX_EVENTS`` recent events, refusals counted for
  at most ``MAX_KEYS`` API-key fingerprints (the rest under ``other``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm_client.types import StreamEvent
from swarm_coordinator.errors import PolicyError
from swarm_coordinator.http.audit import AuditLog, prompt_hash
from swarm_coordinator.http.errors import OpenAIError
from swarm_coordinator.http.policy import CompletionFilter, Match, Policy, load_policy

if TYPE_CHECKING:
    from swarm_coordinator.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)

__all__ = ["PolicyGate", "refusal"]

MAX_EVENTS = 50
MAX_KEYS = 1024


def refusal(match: Match, param: str) -> OpenAIError:
    """A refused prompt in OpenAI's shape: 400, code ``content_policy_violation``."""
    return OpenAIError(
        400,
        f"Your request was rejected by this server's usage policy (rule '{match.rule}').",
        param=param,
        code="content_policy_violation",
    )


class PolicyGate:
    """The gateway's policy, reloads and decision records (event loop only, no locks)."""

    def __init__(
        self,
        path: str | None,
        metrics: CoordinatorMetrics,
        *,
        audit_log: str | None = None,
        audit_text: bool = False,
        watch_s: float = 1.0,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.watch_s = watch_s
        self.policy = load_policy(path) if path else Policy()  # a bad file at start is fatal
        self.loaded_at = time.time()
        self.reload_error = ""
        self._stamp = self._file_stamp()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.refusals_by_key: dict[str, int] = {}
        self.audit = (
            AuditLog(audit_log, include_text=audit_text, on_drop=metrics.audit_dropped.inc) if audit_log else None
        )
        metrics.policy_rules.set_function(lambda: len(self.policy.rules))

    @property
    def enabled(self) -> bool:
        return bool(self.policy.rules)

    # -- reloads --

    def reload(self, why: str = "reload") -> bool:
        """Load the file again; True when the new rules are in use. A broken file keeps
        the old rules (and says so in the log, on the dashboard and in the metrics)."""
        if not self.path:
            return False
        self._stamp = self._file_stamp()
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.reload_error = str(exc)
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy %s rejected on %s, keeping the %d rules in use: %s", self.path, why, len(self.policy.rules), exc)
            self._event("reload_failed", detail=str(exc))
            return False
        self.policy = policy
        self.loaded_at = time.time()
        self.reload_error = ""
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy %s reloaded on %s: %d rules (%s)", self.path, why, len(policy.rules), ", ".join(policy.ids))
        self._event("reloaded", detail=f"{len(policy.rules)} rules")
        return True

    def on_sighup(self) -> None:
        self.reload("SIGHUP")
        if self.audit is not None:
            self.audit.reopen()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch(self) -> None:
        """Reload when the file changes (polled every ``watch_s``; 0 turns it off)."""
        if not self.path or self.watch_s <= 0:
            return
        while True:
            await asyncio.sleep(self.watch_s)
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self.reload("file change")

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()

    # -- decisions --

    async def check_prompt(self, texts: Sequence[str]) -> Match | None:
        policy = self.policy
        if not policy.prompt_rules:
            return None
        if policy.has_classifiers:
            return await asyncio.to_thread(policy.check_prompt, texts)
        return policy.check_prompt(texts)

    def completion_filter(self) -> tuple[CompletionFilter | None, bool]:
        """A filter for a generation starting now, and whether it must run off the loop."""
        policy = self.policy
        return policy.completion_filter(), policy.has_classifiers

    @staticmethod
    async def push(filt: CompletionFilter, event: StreamEvent, threaded: bool) -> list[StreamEvent]:
        if threaded:
            return await asyncio.to_thread(filt.push, event)
        return filt.push(event)

    def record(
        self,
        *,
        key: str,
        endpoint: str,
        model: str,
        match: Match | None,
        outcome: str,
        finish_reason: str | None,
        prompt: Any,
        prompt_tokens: int,
        completion_tokens: int,
        completion: str | None = None,
    ) -> None:
        """One request's decision: metrics, dashboard, audit line."""
        decision = "allowed" if match is None else ("refused" if match.stage == "prompt" else "stopped")
        rule = match.rule if match is not None else ""
        self.metrics.policy_decisions.labels(decision, rule).inc()
        if match is not None:
            self._event(decision, rule=rule, key=key, endpoint=endpoint, label=match.label)
            slot = key if key in self.refusals_by_key or len(self.refusals_by_key) < MAX_KEYS else "other"
            self.refusals_by_key[slot] = self.refusals_by_key.get(slot, 0) + 1
        if self.audit is not None:
            self.audit.write(
                {
                    "key": key,
                    "endpoint": endpoint,
                    "model": model,
                    "decision": decision,
                    "rule": rule or None,
                    "label": match.label if match is not None else None,
                    "outcome": outcome,
                    "finish_reason": finish_reason,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "prompt_sha256": prompt_hash(prompt),
                    "prompt": prompt,
                    "completion": completion,
                }
            )

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.appendleft({"ts": time.time(), "kind": kind, **{k: v for k, v in fields.items() if v is not None}})

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's policy panel."""
        return {
            "file": str(Path(self.path)) if self.path else None,
            "rules": list(self.policy.ids),
            "loaded_at": self.loaded_at,
            "reload_error": self.reload_error or None,
            "audit_log": str(self.audit.path) if self.audit is not None else None,
            "events": list(self.events),
            "refusals_by_key": dict(sorted(self.refusals_by_key.items(), key=lambda kv: -kv[1])),
        }

