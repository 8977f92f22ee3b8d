"""Text from outside made safe for a terminal or a log line: no control, escape or bidi characters, one line, bounded.

Backends choose their model ids, error bodies, version strings and header values; config files
choose backend names. Any of them may carry an escape sequence that sets the terminal's title,
clears the screen or moves the cursor to forge a table row, a newline that forges a log line, or
a bidi override that shows one name as another. Every face passes such text through
`for_terminal` before it reaches a screen or a log; JSON output keeps the exact text, which JSON
escapes itself.
"""

from __future__ import annotations

import re
import unicodedata

ELLIPSIS = "…"

# Whole escape sequences go, not just their ESC, so no "[2J" debris is left behind:
# CSI (ESC [ or the C1 byte 0x9B) with parameters and a final byte; OSC, DCS, SOS, PM and APC
# strings up to their terminator (BEL or ST), or to the end of the text when unterminated;
# and two-character escapes.
_SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[\x20-\x7e]?"
)
# Line and paragraph breaks, tabs and the like become one space, so a message stays one line.
_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029]+")
# Unicode categories never printed: controls (Cc), format characters (Cf: bidi overrides and
# isolates, zero-width joiners and spaces, the BOM), surrogates (Cs) and unassigned code points (Cn).
_SPACES = re.compile(" {2,}")
_HIDDEN = frozenset(("Cc", "Cf", "Cs", "Cn"))


def _visible(ch: str) -> bool:
    if ch.isascii():
        return " " <= ch <= "~"
    return unicodedata.category(ch) not in _HIDDEN


def for_terminal(text: object, limit: int = 200) -> str:
    """`text` as one printable line of at most `limit` characters (ending in "…" when cut)."""
    s = text if isinstance(text, str) else str(text)
    if s.isascii() and s.isprintable() and len(s) <= limit:
        return s  # the common case, with no work
    s = _SEQUENCES.sub("", s)
    s = _BREAKS.sub(" ", s)
    s = "".join(ch for ch in s if _visible(ch))
    return clip(_SPACES.sub(" ", s).strip(), limit)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, the last of them "…" when anything was cut."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS


def is_clean_name(text: str) -> bool:
    """Whether a name from the config prints as itself (no control, format or bidi characters)."""
    return all(_visible(ch) for ch in text)
