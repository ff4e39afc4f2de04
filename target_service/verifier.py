"""One target session: the committed sequence and the verification of draft windows.

Model code only: no gRPC here. The target is the source of truth: every verdict commits the
accepted draft tokens plus the target's own next token (correction or bonus), so the KV cache
always covers the committed sequence but its last token, which the next verification feeds.
"""

from dataclasses import dataclass

import torch

from specdec.acceptance import accept_greedy, choose_greedy
from specdec.kv import CachedSequence


class ProtocolError(ValueError):
    """A request that does not fit the session's state."""


@dataclass
class Verdict:
    position: int  # first verified position (committed length before this verdict)
    verified: int  # draft tokens judged
    accepted: int  # accepted prefix
    token_id: int  # the target's token at position + accepted
    committed: int  # committed length after: position + accepted + 1
    forward_ns: int
    started_unix_ns: int
    input_tokens: int


class TargetSession:
    def __init__(self, model: torch.nn.Module, prompt_ids: list[int], max_positions: int):
        if not prompt_ids:
            raise ProtocolError("start.prompt_ids is empty")
        if len(prompt_ids) >= max_positions:
            raise ProtocolError(
                f"start.prompt_ids has {len(prompt_ids)} tokens; the model takes {max_positions}")
        self.max_positions = max_positions
        self.seq = CachedSequence(model, prompt_ids)

    def start(self) -> Verdict:
        """Prefill the prompt and choose the first new token."""
        position = len(self.seq)
        f = self.seq.forward(keep=1)
        token = choose_greedy(f.logits[-1])
        self.seq.extend([token])
        return Verdict(position, 0, 0, token, position + 1, f.forward_ns, f.started_unix_ns,
                       f.input_tokens)

    def verify(self, position: int, draft: list[int]) -> Verdict:
        """Judge ``draft`` for positions position.. and commit the verdict."""
        if self.seq.cached == 0:
            raise ProtocolError("window before start")
        if position != len(self.seq):
            raise ProtocolError(
                f"window.position={position} but the committed length is {len(self.seq)}")
        if position + len(draft) >= self.max_positions:
            raise ProtocolError(
                f"window reaches position {position + len(draft)}; the model takes "
                f"{self.max_positions}")
        self.seq.extend(draft)
        f = self.seq.forward(keep=len(draft) + 1)  # logits[i] predicts position + i
        accepted, token = accept_greedy(f.logits, draft)
        self.seq.truncate(position + accepted)
        self.seq.extend([token])
        return Verdict(position, len(draft), accepted, token, position + accepted + 1,
                       f.forward_ns, f.started_unix_ns, f.input_tokens)
