"""The daemons' shared start-up: flags with SWARM_<FLAG> fallbacks, and logging levels."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from swarm_proto.flags import env_name, flag_adder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add = flag_adder(p)
    add("--max-length", int, 8, "positions")
    add("--api-key", str, None, "keys", action="append")
    return p


def test_flags_fall_back_to_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("--max-length") == "SWARM_MAX_LENGTH"
    assert _parser().parse_args([]).max_length == 8
    monkeypatch.setenv("SWARM_MAX_LENGTH", "64")
    monkeypatch.setenv("SWARM_API_KEY", "k1, k2,")
    ns = _parser().parse_args([])
    assert ns.max_length == 64 and ns.api_key == ["k1", "k2"]
    ns = _parser().parse_args(["--max-length", "16", "--api-key", "k3"])
    assert ns.max_length == 16  # the flag wins over the variable
    assert ns.api_key[-1] == "k3" and len(ns.api_key) == 3  # a repeatable flag adds to the variable's list


_PROBE = """
import logging, sys
from swarm_proto.daemon import setup_logging
setup_logging(sys.argv[1])
logging.getLogger("transitions.core").info("third-party info")
logging.getLogger("transitions.core").warning("third-party warning")
logging.getLogger("swarm_coordinator.registry").info("our info")
logging.getLogger("swarm_node.rpc").debug("our debug")
"""


@pytest.mark.parametrize(
    ("level", "shown", "hidden"),
    [
        ("INFO", ["third-party warning", "our info"], ["third-party info", "our debug"]),
        ("debug", ["third-party info", "third-party warning", "our info", "our debug"], []),
        ("WARNING", ["third-party warning"], ["third-party info", "our info"]),
    ],
)
def test_other_libraries_log_at_warning_unless_debug(level: str, shown: list[str], hidden: list[str]) -> None:
    err = subprocess.run([sys.executable, "-c", _PROBE, level], capture_output=True, text=True, check=True).stderr
    for line in shown:
        assert line in err
    for line in hidden:
        assert line not in err

