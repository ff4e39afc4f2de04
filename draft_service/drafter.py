"""One draft session: drafts tokens past the committed end, window by window, and rolls back.

Model code only: no gRPC here. The servicer feeds it control messages and sends its proposals.
"""

import threading

from draft_service.replay import ReplaySession
from specdec.answers import Proposal, StepTiming
from specdec.checks import ProtocolError, check_ids, check_prompt
from specdec.engine import Engine
from specdec.sampling import DRAFT, Sampling, WireDist, compress, uniform, warp
from specdec.scheduler import WorkKind
from specdec.sequence import make_abortable


class DraftSession:
    """The draft's sequence: committed tokens it was told plus the tokens it drafted itself.

    ``goal`` is the length to draft up to; ``windows`` maps window start positions to ids so that
    each proposal carries the window it belongs to.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], window_id: int, goal: int,
                 max_positions: int, sampling: Sampling = Sampling(), q_tail: float = 1e-4,
                 replay: ReplaySession | None = None):
        check_prompt(prompt_ids, engine.model.config.vocab_size, max_positions)
        if replay is not None and not sampling.greedy:
            raise ProtocolError("start.sampling: this draft replays greedy references "
                                "(--replay, a benchmarking draft); it does not sample")
        self.replay = replay
        self.max_positions = max_positions
        self.sampling = sampling
        self.q_tail = q_tail
        if not engine.batched:  # transformers' forward: stop it between layers by a hook
            make_abortable(engine.model)
        self.seq = engine.sequence(prompt_ids, WorkKind.DRAFT)
        self.windows: list[tuple[int, int]] = [(len(prompt_ids), window_id)]
        self.last_window_id = window_id
        self.goal = self._checked_goal(goal, "start.draft_until")

    def close(self) -> None:
        """Give the session's KV slots back to the engine."""
        self.seq.close()

    def _checked_window(self, window_id: int, field: str) -> None:
        if window_id <= self.last_window_id:
            raise ProtocolError(f"{field}={window_id} does not come after window "
                                f"{self.last_window_id}: window ids must increase")
        self.last_window_id = window_id

    def _checked_goal(self, goal: int, field: str) -> int:
        if goal < len(self.seq):
            raise ProtocolError(f"{field}={goal} is behind the sequence end {len(self.seq)}")
        if goal > self.max_positions:
            raise ProtocolError(f"{field}={goal} is past the model's {self.max_positions} positions")
        return goal

    @property
    def wants_token(self) -> bool:
        return len(self.seq) < self.goal

    def window_of(self, position: int) -> int:
        return next(wid for start, wid in reversed(self.windows) if start <= position)

    def extend(self, window_id: int, goal: int) -> None:
        """A new window continuing the current sequence, up to ``goal`` tokens."""
        if goal < self.goal:
            raise ProtocolError(f"extend.draft_until={goal} goes back from {self.goal}")
        goal = self._checked_goal(goal, "extend.draft_until")
        self._checked_window(window_id, "extend.window_id")
        self.windows.append((self.goal, window_id))
        self.goal = goal

    def rollback(self, keep: int, append_ids: list[int], window_id: int, goal: int) -> None:
        """Keep ``keep`` tokens, append committed ones, draft a new window up to ``goal``."""
        if keep > len(self.seq):
            raise ProtocolError(f"rollback.keep={keep} is past the sequence end {len(self.seq)}")
        if keep + len(append_ids) == 0:
            raise ProtocolError("rollback leaves an empty sequence")
        if keep + len(append_ids) >= self.max_positions:
            raise ProtocolError(f"rollback.append_ids reach position {keep + len(append_ids)}; "
                                f"the model takes {self.max_positions}")
        check_ids(append_ids, self.seq.model.config.vocab_size, "rollback.append_ids")
        self._checked_window(window_id, "rollback.window_id")
        self.seq.truncate(keep)
        self.seq.extend(append_ids)
        self.windows = [(len(self.seq), window_id)]
        self.goal = self._checked_goal(goal, "rollback.draft_until")

    def step(self, abort: threading.Event | None = None) -> Proposal[WireDist]:
        """Draft one token at the end of the sequence (one forward pass).

        Raises specdec.sequence.Aborted, leaving the session as it was, when ``abort`` is set before
        the pass ends (a rollback or stop arrived: the token would be stale)."""
        f = self.seq.forward(keep=1, abort=abort)
        position = len(self.seq)
        q = None
        if self.sampling.greedy:  # q is one-hot: the id alone says it
            token = int(f.logits[-1].argmax())
            if self.replay is not None:
                token = self.replay.token(self.seq.ids, token)
        else:  # draw from the very distribution that will cross the wire
            q = compress(warp(f.logits[-1], self.sampling), self.q_tail)
            token = q.sample(uniform(self.sampling.seed, position, DRAFT))
        self.seq.extend([token])
        return Proposal(self.window_of(position), position, token, StepTiming.of(f), q)
