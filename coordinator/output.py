"""Committed tokens turned into streamed text, with the stop conditions applied.

The schedules commit token ids; this decides where generation ends (max_new_tokens, an EOS id,
a stop string) so that nothing past the end is ever emitted, and streams text deltas that never
have to be taken back (an incomplete UTF-8 character or a possible stop-string prefix is held).
The target's logprobs of the ids, when asked for, travel with them and are cut with them.
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from specdec.logprobs import TokenLogprob


@dataclass
class Emitted:
    """Text and token ids committed since the last ``Emitted``, for one ``GenerateResponse``."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per id, when asked for


class Output:
    def __init__(self, tokenizer, max_new_tokens: int, eos_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per id in ids, when the request asked
        self.sent_ids = 0
        self.sent_text = 0
        self.finish_reason: str | None = None
        self.queue: asyncio.Queue[Emitted | None] = asyncio.Queue()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def commit(self, ids: list[int], logprobs: Sequence[TokenLogprob] = ()) -> bool:
        """Take newly committed ids, with their logprobs (one each) when the request asked for
        them; return True when generation has ended. Ids past the end are dropped, and their
        logprobs with them."""
        for i, t in enumerate(ids):
            if self.done:
                break
            self.ids.append(t)
            if logprobs:
                self.logprobs.append(logprobs[i])
            if t in self.eos_ids:
                self.finish_reason = "eos"
            elif self.stop and self._stop_at() is not None:
                self.finish_reason = "stop"
            elif len(self.ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        self._emit()
        return self.done

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _stop_at(self, text: str | None = None) -> int | None:
        text = self._text() if text is None else text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit(self) -> None:
        text = self._text()
        if self.done:
            cut = self._stop_at(text) if self.finish_reason == "stop" else None
            ready = text if cut is None else text[:cut]
        else:
            ready = text.rstrip("\ufffd")  # an incomplete UTF-8 character decodes to U+FFFD
            ready = ready[: len(ready) - self._held(ready)]
        delta = Emitted(ready[self.sent_text:] if len(ready) > self.sent_text else "",
                        self.ids[self.sent_ids:], self.logprobs[self.sent_ids:])
        self.sent_text = max(self.sent_text, len(ready))
        self.sent_ids = len(self.ids)
        if delta.text or delta.token_ids:
            self.queue.put_nowait(delta)
        if self.done:
            self.queue.put_nowait(None)

    def _held(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could start a stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def text(self) -> str:
        """All text emitted so far (the final text once done)."""
        return self._text()[: self.sent_text]
