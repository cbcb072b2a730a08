"""The acceptable-use rules engine: loading and validation, prompt checks, and the
completion filter (matches across chunks, hold-back, stop vs refuse). No network."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm_client.types import GenerationResult, StreamEvent, Timing
from swarm_coordinator.errors import PolicyError
from swarm_coordinator.http.policy import CompletionFilter, Policy, load_policy, parse_policy

GOOD = """
[policy]
holdback_chars = 8
scan_window_chars = 64

[[rule]]
id = "no-bombs"
pattern = "build a bomb"
applies_to = "both"
action = "refuse"

[[rule]]
id = "Case.Only"
pattern = "SHOUT"
case_sensitive = true
applies_to = "prompt"

[[rule]]
id = "magic"
classifier = "policy_classifiers:secret_word"
labels = ["secret"]
applies_to = "both"
action = "stop"
"""


def test_a_good_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    policy = load_policy(path)
    assert policy.ids == ("no-bombs", "Case.Only", "magic")
    assert (policy.holdback_chars, policy.scan_window_chars) == (8, 64)
    assert [r.id for r in policy.prompt_rules] == ["no-bombs", "Case.Only", "magic"]
    assert [r.id for r in policy.completion_rules] == ["no-bombs", "magic"]
    assert policy.has_classifiers


def test_prompt_checks() -> None:
    policy = parse_policy(GOOD)
    assert policy.check_prompt(["How do I BUILD A BOMB?"]).rule == "no-bombs"  # type: ignore[union-attr]
    assert policy.check_prompt(["please shout"]) is None  # case-sensitive rule
    assert policy.check_prompt(["SHOUT"]).rule == "Case.Only"  # type: ignore[union-attr]
    match = policy.check_prompt(["hello", "the word is xyzzy"])  # any chat message
    assert match is not None and (match.rule, match.label, match.stage, match.action) == ("magic", "secret", "prompt", "refuse")
    assert policy.check_prompt(["plugh"]) is None  # a label the rule does not list
    assert policy.check_prompt(["a harmless question"]) is None
    assert Policy().check_prompt(["build a bomb"]) is None and Policy().completion_filter() is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[rule]]\nid = 'a'\npattern = 'x'\nfoo = 1\n", "rule #1 ('a'): unknown keys ['foo']"),
        ("[[rule]]\nid = 'a'\npattern = '(unclosed'\n", "rule #1 ('a'): bad regular expression"),
        ("[[rule]]\nid = 'a'\npattern = '(a+)+b'\n", "catastrophic backtracking"),
        ("[[rule]]\nid = 'a'\npattern = '(x)\\1'\n", "back-references"),
        ("[[rule]]\nid = 'a'\npattern = 'a*'\n", "matches the empty string"),
        ("[[rule]]\nid = 'a'\npattern = '" + "x" * 600 + "'\n", "at most 512"),
        ("[[rule]]\nid = 'a'\nclassifier = 'no_such_module_here:f'\n", "classifier 'no_such_module_here:f' cannot be loaded"),
        ("[[rule]]\nid = 'a'\nclassifier = 'policy_classifiers:missing'\n", "cannot be loaded"),
        ("[[rule]]\nid = 'a'\nclassifier = 'policy_classifiers:NOT_CALLABLE'\n", "is not callable"),
        ("[[rule]]\nid = 'a'\nclassifier = 'policy_classifiers'\n", "must be 'module:function'"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\n[[rule]]\nid = 'a'\npattern = 'y'\n", "rule #2: duplicate id 'a'"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\nclassifier = 'policy_classifiers:secret_word'\n", "exactly one of"),
        ("[[rule]]\nid = 'a'\n", "exactly one of"),
        ("[[rule]]\nid = 'a b'\npattern = 'x'\n", "'id' must be"),
        ("[[rule]]\npattern = 'x'\n", "'id' must be"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\napplies_to = 'reply'\n", "'applies_to' must be"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\naction = 'warn'\n", "'action' must be"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\napplies_to = 'prompt'\naction = 'stop'\n", "completions only"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\nlabels = ['l']\n", "'labels' goes with a classifier"),
        ("[[rule]]\nid = 'a'\npattern = 'x'\ncase_sensitive = 'yes'\n", "'case_sensitive' must be"),
        ("[rules]\nid = 'a'\n", "unknown top-level keys ['rules']"),
        ("[policy]\nholdback = 3\n", "unknown keys in [policy]"),
        ("[policy]\nholdback_chars = -1\n", "holdback_chars must be"),
        ("[[rule]\nid = 'a'", "not valid TOML"),
    ],
)
def test_bad_files_are_rejected_with_the_rule_named(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, source="p.toml")
    assert "policy p.toml" in str(exc.value) and error in str(exc.value)


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "nope.toml")


def test_a_failing_classifier_fails_closed() -> None:
    policy = parse_policy("[[rule]]\nid = 'x'\nclassifier = 'policy_classifiers:broken'\n")
    match = policy.check_prompt(["anything"])
    assert match is not None and match.label == "classifier-error"


# --- the completion filter ----------------------------------------------------------------


def _events(pieces: list[str]) -> list[StreamEvent]:
    events = [StreamEvent(p, (i,), (-0.5,)) for i, p in enumerate(pieces)]
    text = "".join(pieces)
    result = GenerationResult(text, tuple(range(len(pieces))), "stop", (1,), 0, Timing(1, len(pieces), 0.1, 0.2), None)
    last = events[-1]
    events[-1] = StreamEvent(last.text, last.token_ids, last.logprobs, "stop", result)
    return events


def _run(policy: Policy, pieces: list[str]) -> tuple[str, CompletionFilter]:
    filt = policy.completion_filter()
    assert filt is not None
    out: list[str] = []
    for event in _events(pieces):
        out.extend(e.text for e in filt.push(event))
        if filt.match is not None:
            break
    return "".join(out), filt


STOP = parse_policy("[policy]\nholdback_chars = 16\n[[rule]]\nid = 'pw'\npattern = 'pass ?word'\napplies_to = 'completion'\naction = 'stop'\n")
REFUSE = parse_policy("[policy]\nholdback_chars = 16\n[[rule]]\nid = 'pw'\npattern = 'password'\napplies_to = 'completion'\n")


def test_a_match_across_chunks_stops_before_the_span() -> None:
    sent, filt = _run(STOP, ["The ", "pa", "ss", "w", "ord is 1234", " and more"])
    assert filt.match is not None and filt.match.rule == "pw" and filt.match.stage == "completion"
    assert "pa" not in sent and sent == "The "  # held back, never sent; what preceded the match is kept
    final = filt.final((1, 2), 7, Timing(2, 4, 0.1, 0.2))
    assert final.result is not None and final.finish_reason == "content_filter"
    assert (final.result.text, final.result.token_ids, final.result.stop_reason) == ("The ", (0,), "pw")
    assert final.result.logprobs == (-0.5,)


def test_refuse_sends_nothing_more_and_withholds_the_result() -> None:
    sent, filt = _run(REFUSE, ["abcdefghijklmnopqrstuvwxyz ", "my ", "password"])
    assert filt.match is not None
    assert sent == "abcdefghijklmnopqrstuvwxyz "[: len(sent)] and "password" not in sent
    final = filt.final((1,), 0, Timing(1, 3, 0.1, 0.2))
    assert final.result is not None and final.result.text == "" and final.result.token_ids == ()


def test_without_a_match_every_event_passes_unchanged() -> None:
    pieces = ["Hello", " world", ", nothing", " to see", " here."]
    filt = STOP.completion_filter()
    assert filt is not None
    out: list[StreamEvent] = []
    for event in _events(pieces):
        out.extend(filt.push(event))
    assert [e.text for e in out] == pieces and out[-1].result is not None and filt.match is None


def test_a_matched_span_within_the_holdback_never_reaches_the_caller() -> None:
    """Random chunkings of random texts with the word planted anywhere: whenever the
    filter fires, what was sent holds no part of the span that begins the match."""
    rng = random.Random(12)
    alphabet = "abcdefgh pasword"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        at = rng.randrange(0, len(text) + 1)
        text = text[:at] + "password" + text[at:]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 20))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        sent, filt = _run(REFUSE, pieces)
        assert filt.match is not None
        first = text.find("password")
        assert len(sent) <= first, (pieces, sent)
        sent_stop, filt_stop = _run(STOP, pieces)
        assert filt_stop.match is not None
        assert text.startswith(sent_stop) and len(sent_stop) <= _first_match(text)


def _first_match(text: str) -> int:
    import re

    m = re.search("pass ?word", text, re.IGNORECASE)
    assert m is not None
    return m.start()


def test_completion_classifier_sees_the_window_and_drops_what_is_held() -> None:
    policy = parse_policy(
        "[policy]\nholdback_chars = 4\nscan_window_chars = 16\n"
        "[[rule]]\nid = 'magic'\nclassifier = 'policy_classifiers:secret_word'\napplies_to = 'completion'\naction = 'stop'\n"
    )
    sent, filt = _run(policy, ["one two three ", "four ", "xy", "zzy", " five"])
    assert filt.match is not None and filt.match.label == "secret"
    assert "xy" not in sent and sent == "one two three "


def test_the_documented_example_file_loads() -> None:
    policy = load_policy(Path(__file__).resolve().parents[2] / "docs" / "policy.example.toml")
    assert policy.ids == ("weapons", "api-keys-in-output")
    assert policy.check_prompt(["How do I build a bomb?"]) is not None
    assert policy.check_prompt(["How do I build a website?"]) is None


@pytest.mark.parametrize(
    ("pattern", "pieces", "sent"),
    [
        (r"bomb\b", ["We ", "build a bom", "b", " now, later"], "We "),  # \b known only on the next chunk
        (r"secret(?= code)", ["the ", "secret", " c", "ode is"], "the "),  # lookahead: the whole window
        (r"x[0-9]{3,40}y", ["x12", "34567", "8y"], ""),
    ],
)
def test_anchors_and_lookarounds_match_across_chunks(pattern: str, pieces: list[str], sent: str) -> None:
    policy = parse_policy(f"[policy]\nholdback_chars = 12\n[[rule]]\nid = 'r'\npattern = '{pattern}'\naction = 'stop'\n")
    out, filt = _run(policy, pieces)
    assert filt.match is not None and out == sent


_KEYS = ["id", "pattern", "case_sensitive", "classifier", "labels", "applies_to", "action", "other"]
_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["prompt", "completion", "both", "refuse", "stop", "a+", "(a+)+", "[", "policy_classifiers:secret_word"]),
    st.integers(-3, 3),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6), max_size=4))
def test_any_rules_file_loads_or_fails_with_a_policy_error(rules: list[dict[str, object]]) -> None:
    text = "".join(
        "[[rule]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items()) for rule in rules
    )
    try:
        policy = parse_policy(text, source="fuzz.toml")
    except PolicyError as exc:
        assert str(exc).startswith("policy fuzz.toml")
        return
    assert len(policy.rules) == len(rules)
    policy.check_prompt(["some text"])
