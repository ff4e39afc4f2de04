"""One target session: the committed sequence and the verification of draft windows.

Model code only: no gRPC here. The target is the source of truth: every verdict commits the
accepted draft tokens and, when it chooses one, its own next token (a correction, a bonus or the
first token). When it chooses none (a fully accepted window in pearl), it keeps the distribution
of the next position ("held"), so the draft's token there can be judged without a forward pass
and every position is decided by the same rule whatever window it arrived in.

When the session asks for them, each verdict carries the log-probability of every token it
commits, from the same logits that decided the token (specdec/logprobs.py).
"""

import torch

from specdec.acceptance import choose, judge
from specdec.answers import StepTiming, Verdict
from specdec.checks import ProtocolError, check_ids, check_prompt
from specdec.engine import Engine
from specdec.logprobs import MAX_TOP_LOGPROBS, token_logprobs
from specdec.sampling import Sampling, WireDist
from specdec.scheduler import WorkKind


def check_logprobs(logprobs: int | None) -> None:
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ProtocolError(f"start.top_logprobs={logprobs} is out of range: "
                            f"0..{MAX_TOP_LOGPROBS}")


class TargetSession:
    def __init__(self, engine: Engine, prompt_ids: list[int],
                 max_positions: int, sampling: Sampling = Sampling(),
                 logprobs: int | None = None):
        """``logprobs``: None, or report each committed token's logprob with that many top
        alternatives."""
        check_prompt(prompt_ids, engine.model.config.vocab_size, max_positions)
        check_logprobs(logprobs)
        self.max_positions = max_positions
        self.sampling = sampling
        self.logprobs = logprobs
        self.seq = engine.sequence(prompt_ids, WorkKind.VERIFY)
        self.held: torch.Tensor | None = None  # logits [vocab] of position len(seq), if kept
        self.started = False

    def start(self, first_token: bool) -> Verdict:
        """Prefill the prompt; choose the first new token now or hold its distribution."""
        position = len(self.seq)
        f = self.seq.forward(keep=1)
        self.started = True
        token = None
        if first_token:
            token = choose(f.logits[-1], self.sampling, position)
            self.seq.extend([token])
        else:
            self.held = f.logits[-1]
        v = Verdict(position, 0, 0, token, len(self.seq), StepTiming.of(f))
        return self._scored(v, f.logits[-1:], [] if token is None else [token])

    def close(self) -> None:
        """Give the session's KV slots back to the engine."""
        self.seq.close()

    def verify(self, position: int, draft: list[int], qs: list[WireDist], bonus: bool,
               held: bool) -> Verdict:
        """Judge ``draft`` for positions position.. and commit the verdict."""
        self._check(position, draft, qs, held)
        if not draft and self.held is not None:  # the target alone, from the kept distribution
            logits = self.held[None]
            token = choose(self.held, self.sampling, position)
            self.held = None
            self.seq.extend([token])  # committed, not yet fed
            return self._scored(Verdict(position, 0, 0, token, len(self.seq)), logits, [token])
        if held:  # one token, judged with the kept distribution: no forward pass
            logits = self.held[None]
            accepted, token = judge(logits, draft, qs, self.sampling, position, False)
            self.held = None
            self.seq.extend(draft if accepted else [token])  # committed, not yet fed
            f = None
        else:
            self.seq.extend(draft)
            if self.held is not None:  # position's logits are kept: feed only the draft
                f = self.seq.forward(keep=len(draft))
                logits = torch.cat([self.held[None], f.logits])
                self.held = None
            else:  # feed the last committed token too: logits[i] predicts position + i
                f = self.seq.forward(keep=len(draft) + 1)
                logits = f.logits
            accepted, token = judge(logits, draft, qs, self.sampling, position, bonus)
            self.seq.truncate(position + accepted)
            if token is not None:
                self.seq.extend([token])
            else:  # all accepted and no bonus: keep the next position's distribution
                self.held = logits[-1]
        v = Verdict(position, len(draft), accepted, token, len(self.seq),
                    StepTiming.of(f) if f is not None else StepTiming())
        # logits[i] decided position + i: the accepted drafts, then the target's own token
        return self._scored(v, logits, draft[:accepted] + ([] if token is None else [token]))

    def _scored(self, v: Verdict, logits: torch.Tensor, committed: list[int]) -> Verdict:
        """``v`` with the logprobs of the ``committed`` ids (row i of ``logits`` decided
        committed[i]), when the session asked for them."""
        if self.logprobs is not None:
            v.logprobs = token_logprobs(logits, committed, self.sampling, self.logprobs)
        return v

    def _check(self, position: int, draft: list[int], qs: list[WireDist], held: bool) -> None:
        if not self.started:
            raise ProtocolError("window before start")
        if position != len(self.seq):
            raise ProtocolError(
                f"window.position={position} but the committed length is {len(self.seq)}")
        if position + max(len(draft), 1) > self.max_positions:  # may end at the last position
            raise ProtocolError(f"window reaches position {position + max(len(draft), 1) - 1}; "
                                f"the model takes {self.max_positions}")
        check_ids(draft, self.seq.model.config.vocab_size, "window.draft_ids")
        if not self.sampling.greedy and len(qs) != len(draft):
            raise ProtocolError(f"window.q has {len(qs)} distributions for {len(draft)} tokens")
        if held and (self.held is None or len(draft) != 1):
            raise ProtocolError("window.held needs exactly one draft token and a held "
                                "distribution (after start without first_token or a fully "
                                "accepted window without bonus)")
