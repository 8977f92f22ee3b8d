"""Secrets never reach a screen, a log or an HTTP answer: every form of a key found in a text is masked.

A server may echo the request's headers in its error, quote the key in JSON (escaped), in a
URL (percent-encoded), or cut its error body in the middle of the key. The engine passes every
text it keeps from a backend through its Redactor before cutting it to length, so a key cut
short by llmtop can never leak; a key cut short by the server, or by the bounded read of an
error body, is caught at either end of the text.
"""

from __future__ import annotations

import json
from urllib.parse import quote

MASK = "***"
MIN_SECRET = 4  # shorter values are not worth masking (and would mask ordinary words)
MIN_PARTIAL = 4  # a cut-off piece of a key this long is masked at either end of a text
MIN_PIECE = 8  # and this long anywhere in it ("Bearer sk-proj-Abc123..." cut by a server, then "...")


def _forms(secret: str) -> set[str]:
    """The ways a secret may be written in an error message."""
    forms = {secret, secret.strip()}
    for s in list(forms):
        forms.add(json.dumps(s)[1:-1])  # JSON-escaped
        forms.add(repr(s)[1:-1])  # Python repr, as some servers' tracebacks show it
        forms.add(quote(s, safe=""))  # percent-encoded, in a URL or a form
    return {f for f in forms if len(f) >= MIN_SECRET}


class Redactor:
    """Masks the given secrets, in whole or cut at either end of the text."""

    def __init__(self, secrets: tuple[str, ...] | list[str] = ()):
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret.strip()) >= MIN_SECRET:
                forms |= _forms(secret)
        # Longest first, so a form that contains another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        if not self._forms or not text:
            return text
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return self._cut_ends(self._pieces(text))

    def _pieces(self, text: str) -> str:
        """The start or the end of a key, MIN_PIECE characters or more, wherever it stands: a
        server that cut the key short and went on ("...", a quote) leaves such a piece mid-text."""
        for form in self._forms:
            if len(form) <= MIN_PIECE:
                continue
            head, tail = form[:MIN_PIECE], form[-MIN_PIECE:]
            start = text.find(head)
            while start != -1:
                end = start + MIN_PIECE
                while end < len(text) and end - start < len(form) and text[end] == form[end - start]:
                    end += 1
                text = text[:start] + MASK + text[end:]
                start = text.find(head, start + len(MASK))
            end = text.find(tail)
            while end != -1:
                stop = end + MIN_PIECE
                begin = end
                while begin > 0 and stop - begin < len(form) and text[begin - 1] == form[len(form) - (stop - begin) - 1]:
                    begin -= 1
                text = text[:begin] + MASK + text[stop:]
                end = text.find(tail, begin + len(MASK))
        return text

    def _cut_ends(self, text: str) -> str:
        """A piece of a key at the end (a prefix of it, the text cut after) or at the start (a
        suffix of it, the text cut before) is masked as if the key were whole."""
        for form in self._forms:
            for n in range(min(len(form) - 1, len(text)), MIN_PARTIAL - 1, -1):
                if text.endswith(form[:n]):
                    text = text[:-n] + MASK
                    break
            for n in range(min(len(form) - 1, len(text)), MIN_PARTIAL - 1, -1):
                if text.startswith(form[-n:]):
                    text = MASK + text[n:]
                    break
        return text
