"""A request's output as text, sent piece by piece, cut at the first stop string.

Tokens arrive a few at a time; the text a client sees must be exactly the decoding of all of them (cut before a stop
string), so each piece is the difference between the whole decoding now and what was already sent. Text that might
be the start of a stop string, or ends in half a multi-byte character, is held back until the next tokens decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class IncrementalText:
    """Decodes one request's tokens and finds its stop strings; `sent` is the text delivered so far."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_ids = set(skip_ids)  # EOS ids: they end the output, they are not text
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was found: `sent` is the whole output

    def feed(self, tokens: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Take new tokens; return the text to send now and whether a stop string ended the output.

        `final`: no tokens will follow, so nothing is held back."""
        self.ids.extend(t for t in tokens if t not in self.skip_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut]), True
        if final:
            return self._advance(text), False
        text = text.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
        return self._advance(text[: len(text) - self._held(text)]), False

    def _advance(self, upto: str) -> str:
        """The part of `upto` not sent yet, now sent."""
        piece = upto[len(self.sent):] if len(upto) > len(self.sent) else ""
        self.sent += piece
        return piece

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts, looking only where a new one can be (not deep in sent text)."""
        if not self.stop:
            return None
        start = max(0, len(self.sent) - max(map(len, self.stop)) + 1)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """How many trailing characters could still grow into a stop string (so must not be sent yet)."""
        unsent = len(text) - len(self.sent)
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, unsent), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held
