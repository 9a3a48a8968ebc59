"""Text from outside (layer names, paths, file contents) made safe to print or embed.

A model's layer names, class names and file paths are chosen by whoever wrote the model or
the file: they may hold terminal escape sequences, bidirectional-override characters or rich
markup. :func:`printable` keeps what a terminal shows as text; :func:`markup_safe` also
escapes rich's markup, for strings placed inside markup.

    >>> printable("layer\\x1b[2J\\u202eevil")
    'layer?[2J?evil'
    >>> markup_safe("[/]")
    '\\\\[/]'
"""

from __future__ import annotations

import re
import unicodedata

from rich.markup import escape

#: Characters a terminal (or a reader) could take for something other than text: C0/C1
#: controls (escape sequences start with ESC), bidirectional overrides and isolates.
_UNPRINTABLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``str(text)`` with every control and bidi-override character replaced by ``?``
    (newlines and tabs too, unless ``keep_newlines``)."""
    text = str(text)
    if not keep_newlines:
        text = text.replace("\n", "?").replace("\t", " ")
    cleaned = _UNPRINTABLE.sub("?", text)
    # Other format characters (Cf) that can reorder or hide text (none is ASCII).
    if not cleaned.isascii() and any(unicodedata.category(c) == "Cf" for c in cleaned):
        cleaned = "".join("?" if unicodedata.category(c) == "Cf" else c for c in cleaned)
    return cleaned


def markup_safe(text: object) -> str:
    """:func:`printable` text with rich markup escaped, to place inside a markup string."""
    return escape(printable(text))


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``counted(1, "window")`` is "1 window".

    >>> counted(3, "step")
    '3 steps'
    """
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def short_number(value: object) -> str:
    """A number to 4 significant digits; ``"n/a"`` for anything else (None: not measured).

    Example:
        >>> short_number(0.71769), short_number(12), short_number(None)
        ('0.7177', '12', 'n/a')
    """
    return f"{value:.4g}" if isinstance(value, int | float) else "n/a"
