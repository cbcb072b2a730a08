"""The operator's acceptable-use policy: rules from a TOML file, checked at the gateway.

A policy file is an array of tables ``[[rule]]`` (and an optional ``[policy]`` table of
scan settings)::

    [policy]
    holdback_chars = 32        # completion text held back before it is sent (see below)
    scan_window_chars = 512    # completion text re-scanned on every new chunk

    [[rule]]
    id = "no-explosives"                      # letters, digits, . _ : - (at most 64)
    pattern = "how (do|to) (i )?build a bomb" # a regular expression, case-insensitive ...
    case_sensitive = false                    # ... unless this is true
    applies_to = "both"                       # prompt | completion | both
    action = "refuse"                         # refuse | stop

    [[rule]]
    id = "pii"
    classifier = "mypkg.filters:find_pii"     # module:function, text -> label or None
    labels = ["ssn"]                          # optional: only these labels match
    applies_to = "completion"
    action = "stop"

Invariants:

- A file is validated whole when it loads (:func:`load_policy`): unknown keys, a bad
  regular expression, a pattern with nested unbounded repeats or back-references (the
  shapes of catastrophic backtracking), a classifier that does not import or is not
  callable, a duplicate id, ``action = "stop"`` on a prompt-only rule: each is a
  :class:`~swarm_coordinator.errors.PolicyError` naming the file and the rule. A policy in
  use is immutable; a reload builds a new one and swaps it in only when it is valid.
- Prompts are checked whole, every chat message on its own, before any node sees
  them. Any matching rule refuses the prompt (``action`` matters for completions only).
- Completions are checked on the stream by :class:`CompletionFilter`: each new chunk
  is appended to the tail of the text so far and the last ``scan_window_chars`` plus the
  chunk are searched, so a match that straddles chunks (tokens) is found on the chunk
  that completes it. A pattern whose matches are at most W characters long (bounded
  repeats, no lookaround) re-scans only the last W + 8 characters before the chunk. Events are held back until ``holdback_chars`` of text follow them,
  so a matched span of at most ``holdback_chars + 1`` characters never reaches the
  caller. ``stop`` ends the generation and keeps the events before the match;
  ``refuse`` ends it and sends nothing more (a non-streamed answer is withheld whole).
  A classifier match has no span: everything still held back is dropped.
- ReDoS: patterns are at most ``MAX_PATTERN_CHARS`` long and statically refused when
  they nest unbounded repeats or use back-references; a completion search sees at most
  ``scan_window_chars`` + one chunk. Python's ``re`` has no timeout: a pattern with
  overlapping alternatives under a repeat (``(a|a)+``) is not detected and stays the
  operator's responsibility.
- A classifier that raises fails closed: the text counts as matching its rule (logged).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swarm_client.types import GenerationResult, StreamEvent
from swarm_coordinator.errors import PolicyError

if sys.version_info >= (3, 11):
    from re import _parser as sre_parse  # type: ignore[attr-defined]

    import tomllib
else:  # pragma: no cover - Python 3.10
    import sre_parse

    import tomli as tomllib

log = logging.getLogger(__name__)

__all__ = ["CompletionFilter", "Match", "Policy", "Rule", "load_policy", "parse_policy"]

Stage = Literal["prompt", "completion"]
Action = Literal["refuse", "stop"]

MAX_RULES = 256
MAX_PATTERN_CHARS = 512
MAX_LABELS = 64
DEFAULT_HOLDBACK = 32
DEFAULT_WINDOW = 512
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_RULE_KEYS = frozenset({"id", "pattern", "case_sensitive", "classifier", "labels", "applies_to", "action"})
_POLICY_KEYS = frozenset({"holdback_chars", "scan_window_chars"})
_APPLIES = {"prompt": frozenset({"prompt"}), "completion": frozenset({"completion"}), "both": frozenset({"prompt", "completion"})}

Classifier = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Rule:
    id: str
    applies_to: frozenset[str]  # of "prompt", "completion"
    action: Action
    pattern: re.Pattern[str] | None = None
    classifier: Classifier | None = None
    classifier_name: str = ""
    labels: frozenset[str] | None = None  # a classifier's labels that match; None: any label
    reach: int | None = None  # chars before a new chunk a pattern must re-scan; None: the whole window

    def find(self, text: str) -> tuple[int, str | None] | None:
        """Where the rule matches ``text``: (start of the match, or -1 for a classifier,
        the classifier's label); None when it does not."""
        if self.pattern is not None:
            m = self.pattern.search(text)
            return None if m is None else (m.start(), None)
        assert self.classifier is not None
        try:
            label = self.classifier(text)
        except Exception:
            log.exception("policy classifier %s of rule %s failed: the text counts as matching", self.classifier_name, self.id)
            return (-1, "classifier-error")
        if label is None or (self.labels is not None and str(label) not in self.labels):
            return None
        return (-1, str(label))


@dataclass(frozen=True)
class Match:
    """A rule that matched: which, on what, and what it does."""

    rule: str
    action: Action
    stage: Stage
    label: str | None = None


@dataclass(frozen=True)
class Policy:
    """A validated rules file; immutable (a reload swaps in a new one)."""

    rules: tuple[Rule, ...] = ()
    source: str = ""
    holdback_chars: int = DEFAULT_HOLDBACK
    scan_window_chars: int = DEFAULT_WINDOW
    prompt_rules: tuple[Rule, ...] = field(init=False)
    completion_rules: tuple[Rule, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_rules", tuple(r for r in self.rules if "prompt" in r.applies_to))
        object.__setattr__(self, "completion_rules", tuple(r for r in self.rules if "completion" in r.applies_to))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rules)

    @property
    def has_classifiers(self) -> bool:
        """True when checks may run operator code (the gateway then runs them off its loop)."""
        return any(r.classifier is not None for r in self.rules)

    def check_prompt(self, texts: Iterable[str]) -> Match | None:
        """The first rule (in file order) matching any of ``texts`` (a prompt, or each chat
        message's content); None when the prompt may go to the swarm."""
        texts = list(texts)
        for rule in self.prompt_rules:
            for text in texts:
                found = rule.find(text)
                if found is not None:
                    return Match(rule.id, "refuse", "prompt", found[1])
        return None

    def completion_filter(self) -> CompletionFilter | None:
        """A filter for one generation's stream; None when no rule applies to completions."""
        return CompletionFilter(self) if self.completion_rules else None


class CompletionFilter:
    """One generation's completion, checked chunk by chunk (see the module docstring).

    ``push(event)`` returns the events that may go to the caller now; once it reports a
    :class:`Match` (``self.match``), the caller stops the generation and sends
    :meth:`final` as the last event."""

    def __init__(self, policy: Policy) -> None:
        self.rules = policy.completion_rules
        self.holdback = policy.holdback_chars
        self.window = policy.scan_window_chars
        self.tail = ""  # the last `window` characters of the text so far
        self.held: deque[StreamEvent] = deque()
        self.held_chars = 0
        self.sent_text: list[str] = []
        self.sent_ids: list[int] = []
        self.sent_logprobs: list[float] | None = None
        self.match: Match | None = None

    def push(self, event: StreamEvent) -> list[StreamEvent]:
        assert self.match is None, "the generation was stopped"
        region = self.tail + event.text
        region_start = self._total_chars()  # chars before `region` in the whole text
        region_start -= len(self.tail)
        for rule in self.rules:
            skip = 0 if rule.reach is None else max(0, len(self.tail) - rule.reach)
            found = rule.find(region[skip:] if skip else region) if event.text else None
            if found is not None:
                start, label = found
                start = start + skip if start >= 0 else start
                self.match = Match(rule.id, rule.action, "completion", label)
                out: list[StreamEvent] = []
                if rule.action == "stop" and start >= 0:
                    cut = region_start + start  # absolute start of the matched span
                    while self.held and self._sent_chars() + len(self.held[0].text) <= cut:
                        out.append(self._send(self.held.popleft()))
                self.held.clear()
                return out
        self.tail = region[-self.window :] if self.window else ""
        self.held.append(event)
        self.held_chars += len(event.text)
        out = []
        if event.result is not None:  # the end: nothing more can match
            while self.held:
                out.append(self._send(self.held.popleft()))
            return out
        while self.held and self.held_chars - len(self.held[0].text) >= self.holdback:
            out.append(self._send(self.held.popleft()))
        return out

    def final(self, prompt_ids: Sequence[int], seed: int, timing: Any) -> StreamEvent:
        """The last event of a stopped generation: what was sent (``stop``), or nothing
        (``refuse``), with ``finish_reason`` ``content_filter`` and the rule id as
        ``stop_reason``."""
        assert self.match is not None
        keep = self.match.action == "stop"
        result = GenerationResult(
            text="".join(self.sent_text) if keep else "",
            token_ids=tuple(self.sent_ids) if keep else (),
            finish_reason="content_filter",
            prompt_token_ids=tuple(prompt_ids),
            seed=seed,
            timing=timing,
            logprobs=(tuple(self.sent_logprobs) if self.sent_logprobs is not None else None) if keep else None,
            stop_reason=self.match.rule,
        )
        return StreamEvent("", (), None, "content_filter", result)

    def _send(self, event: StreamEvent) -> StreamEvent:
        self.held_chars -= len(event.text)
        self.sent_text.append(event.text)
        self.sent_ids.extend(event.token_ids)
        if event.logprobs is not None:
            self.sent_logprobs = (self.sent_logprobs or []) + list(event.logprobs)
        return event

    def _sent_chars(self) -> int:
        return sum(len(t) for t in self.sent_text)

    def _total_chars(self) -> int:
        return self._sent_chars() + self.held_chars


# --- loading -----------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and validate a rules file; :class:`PolicyError` names the file and the rule."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"policy {path}: cannot read it: {exc.strerror or exc}") from exc
    return parse_policy(data.decode("utf-8", errors="replace"), source=str(path))


def parse_policy(text: str, *, source: str = "policy") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy {source}: not valid TOML: {exc}") from exc
    unknown = set(doc) - {"rule", "policy"}
    if unknown:
        raise PolicyError(f"policy {source}: unknown top-level keys {sorted(unknown)} (expected [[rule]] and [policy])")
    settings = doc.get("policy", {})
    if not isinstance(settings, dict):
        raise PolicyError(f"policy {source}: [policy] must be a table")
    bad = set(settings) - _POLICY_KEYS
    if bad:
        raise PolicyError(f"policy {source}: unknown keys in [policy]: {sorted(bad)} (known: {sorted(_POLICY_KEYS)})")
    holdback = _bounded_int(settings, "holdback_chars", DEFAULT_HOLDBACK, 0, 4096, source)
    window = _bounded_int(settings, "scan_window_chars", DEFAULT_WINDOW, 16, 8192, source)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise PolicyError(f"policy {source}: 'rule' must be an array of tables ([[rule]])")
    if len(raw_rules) > MAX_RULES:
        raise PolicyError(f"policy {source}: {len(raw_rules)} rules, at most {MAX_RULES}")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rules, 1):
        rule = _rule(raw, f"policy {source}: rule #{i}" + (f" ({raw['id']!r})" if isinstance(raw.get("id"), str) else ""))
        if rule.id in seen:
            raise PolicyError(f"policy {source}: rule #{i}: duplicate id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    return Policy(tuple(rules), source, holdback, window)


def _bounded_int(table: Mapping[str, Any], name: str, default: int, lo: int, hi: int, source: str) -> int:
    value = table.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise PolicyError(f"policy {source}: [policy] {name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _rule(raw: Mapping[str, Any], where: str) -> Rule:
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_RULE_KEYS)})")
    rid = raw.get("id")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise PolicyError(f"{where}: 'id' must be 1-64 characters of letters, digits, '.', '_', ':', '-', got {rid!r}")
    applies = raw.get("applies_to", "both")
    if applies not in _APPLIES:
        raise PolicyError(f"{where}: 'applies_to' must be prompt, completion or both, got {applies!r}")
    action = raw.get("action", "refuse")
    if action not in ("refuse", "stop"):
        raise PolicyError(f"{where}: 'action' must be refuse or stop, got {action!r}")
    if action == "stop" and applies == "prompt":
        raise PolicyError(f"{where}: action 'stop' applies to completions only; a prompt can only be refused")
    pattern, classifier = raw.get("pattern"), raw.get("classifier")
    if (pattern is None) == (classifier is None):
        raise PolicyError(f"{where}: give exactly one of 'pattern' and 'classifier'")
    if pattern is not None:
        if "labels" in raw:
            raise PolicyError(f"{where}: 'labels' goes with a classifier, not a pattern")
        case = raw.get("case_sensitive", False)
        if not isinstance(case, bool):
            raise PolicyError(f"{where}: 'case_sensitive' must be true or false")
        compiled = _compile(pattern, case, where)
        return Rule(rid, _APPLIES[applies], action, pattern=compiled, reach=_reach(compiled))
    if "case_sensitive" in raw:
        raise PolicyError(f"{where}: 'case_sensitive' goes with a pattern, not a classifier")
    labels = raw.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or not labels or len(labels) > MAX_LABELS or not all(isinstance(x, str) for x in labels)
    ):
        raise PolicyError(f"{where}: 'labels' must be a non-empty list of at most {MAX_LABELS} strings")
    func = _entry_point(classifier, where)
    return Rule(
        rid, _APPLIES[applies], action, classifier=func, classifier_name=str(classifier),
        labels=frozenset(labels) if labels is not None else None,
    )


def _compile(pattern: Any, case_sensitive: bool, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f"{where}: 'pattern' must be a non-empty string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PolicyError(f"{where}: 'pattern' is {len(pattern)} characters, at most {MAX_PATTERN_CHARS}")
    flags = 0 if case_sensitive else re.IGNORECASE
    try:
        compiled = re.compile(pattern, flags)
    except re.error as exc:
        raise PolicyError(f"{where}: bad regular expression {pattern!r}: {exc}") from exc
    if compiled.match(""):
        raise PolicyError(f"{where}: pattern {pattern!r} matches the empty string (it would match every text)")
    risk = _backtracking_risk(sre_parse.parse(pattern, flags), 0)
    if risk:
        raise PolicyError(f"{where}: pattern {pattern!r} risks catastrophic backtracking ({risk}); rewrite it")
    return compiled


_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_CONTEXT = 8  # chars around a match that anchors such as \b may look at


def _reach(compiled: re.Pattern[str]) -> int | None:
    """How far back before a new chunk a pattern's matches can start: its longest match
    (from the parsed pattern) plus a little context for anchors; None (the whole scan
    window) when matches are unbounded or the pattern has lookarounds, whose text
    ``getwidth`` does not count."""
    parsed = sre_parse.parse(compiled.pattern, compiled.flags)
    if _has_lookaround(parsed):
        return None
    _, hi = parsed.getwidth()
    return None if hi >= sre_parse.MAXREPEAT or hi > DEFAULT_WINDOW else hi + _CONTEXT


def _has_lookaround(sub: Any) -> bool:
    for op, arg in sub:
        name = str(op)
        if name in ("ASSERT", "ASSERT_NOT"):
            return True
        if name in _REPEATS and _has_lookaround(arg[2]):
            return True
        if name in ("SUBPATTERN", "ATOMIC_GROUP") and _has_lookaround(arg[-1]):
            return True
        if name == "BRANCH" and any(_has_lookaround(b) for b in arg[1]):
            return True
    return False


def _backtracking_risk(sub: Any, depth: int) -> str:
    """Why a parsed pattern may backtrack exponentially ('' if no known reason): an
    unbounded repeat inside another repeat, or a back-reference. ``depth`` counts the
    repeats (max > 1) around ``sub`` and whether any of them is unbounded (2)."""
    for op, arg in sub:
        name = str(op)
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "back-references are not allowed"
        if name in _REPEATS:
            _lo, hi, inner = arg
            repeats = hi is sre_parse.MAXREPEAT or hi > 1
            unbounded = hi is sre_parse.MAXREPEAT or hi > 1000
            if repeats and depth and (unbounded or depth == 2):
                return "a repeat nested in a repeat, one of them unbounded"
            why = _backtracking_risk(inner, max(depth, (2 if unbounded else 1) if repeats else 0))
            if why:
                return why
        elif name in ("SUBPATTERN", "ATOMIC_GROUP"):
            why = _backtracking_risk(arg[-1], depth)
            if why:
                return why
        elif name == "BRANCH":
            for branch in arg[1]:
                why = _backtracking_risk(branch, depth)
                if why:
                    return why
        elif name in ("ASSERT", "ASSERT_NOT"):
            why = _backtracking_risk(arg[1], depth)
            if why:
                return why
    return ""


def _entry_point(spec: Any, where: str) -> Classifier:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise PolicyError(f"{where}: 'classifier' must be 'module:function', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise PolicyError(f"{where}: classifier {spec!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise PolicyError(f"{where}: classifier {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]
