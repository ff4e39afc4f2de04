"""What the two model services answer, as plain objects: the draft's ``Proposal`` (a token it
drafted) and the target's ``Verdict`` (its decision on a start or a window), each with the
``StepTiming`` of the forward pass behind it.

The service that makes one and the coordinator that reads it share these classes;
specdec/wire.py turns them into protobuf and back at the two edges (docs/design.md section 3).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from specdec.logprobs import TokenLogprob

if TYPE_CHECKING:
    from specdec.sequence import Forward

Q = TypeVar("Q")  # a proposal's distribution: WireDist where it is drawn, protobuf in transit


@dataclass
class StepTiming:
    """The forward pass behind an answer, as the service measured it; all 0 when no forward
    pass ran (a verdict judged with a held distribution)."""

    forward_ns: int = 0  # duration of the pass (of the engine steps it took part in)
    started_unix_ns: int = 0  # its wall-clock start (Unix ns, the service's clock)
    input_tokens: int = 0  # tokens it fed
    batch_rows: int = 0  # sessions in the (last) engine step that ran it
    batch_tokens: int = 0  # tokens fed in that step, all sessions together
    queue_ns: int = 0  # time it waited in the engine's queue for its step
    cached_tokens: int = 0  # a prefill: prompt tokens whose K/V the prefix cache held (not fed)

    @classmethod
    def of(cls, f: "Forward") -> "StepTiming":
        return cls(f.forward_ns, f.started_unix_ns, f.input_tokens, f.batch_rows,
                   f.batch_tokens, f.queue_ns, f.reused)


@dataclass
class Proposal(Generic[Q]):
    """A token the draft drafted at ``position``, in window ``window_id``."""

    window_id: int
    position: int
    token_id: int
    step: StepTiming = field(default_factory=StepTiming)
    # the distribution it was drawn from (sampling only): the coordinator passes it to the
    # target as it came, in its protobuf form
    q: Q | None = None


@dataclass
class Verdict:
    """The target's answer to a start or a window at ``position``: the first ``accepted`` of the
    ``verified`` draft tokens stand, then ``token_id``, the target's own token (the correction
    after a rejection, the bonus, or the first token after a start); None when it chose none
    and holds the distribution of the next position instead."""

    position: int  # first verified position: the committed length before this verdict
    verified: int  # draft tokens judged
    accepted: int  # the accepted prefix of them
    token_id: int | None
    committed: int  # committed length after it
    step: StepTiming = field(default_factory=StepTiming)
    accepted_ids: list[int] = field(default_factory=list)  # Hidden Transfer: its own drafts kept
    # when the session asked for them: one per committed token (accepted drafts or
    # accepted_ids, then token_id)
    logprobs: list[TokenLogprob] = field(default_factory=list)
