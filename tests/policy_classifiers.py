"""Classifier entry points for the acceptable-use policy tests (``module:function``)."""

from __future__ import annotations

CALLS: list[str] = []


def secret_word(text: str) -> str | None:
    """'secret' when the text names the magic word, 'mild' for a lesser one, else None."""
    CALLS.append(text)
    lowered = text.lower()
    if "xyzzy" in lowered:
        return "secret"
    if "plugh" in lowered:
        return "mild"
    return None


def broken(text: str) -> str | None:
    raise RuntimeError("this classifier always fails")


NOT_CALLABLE = 42
