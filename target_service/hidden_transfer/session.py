"""One Hidden Transfer session: the target decodes alone, drafting for itself (layers.py).

Each step is one forward pass over a token tree:

    root      the token chosen last step (committed, not yet fed), at position p
    nodes     candidates for p+1 .. p+k from the root's draft distributions, shaped by the
              session's rank paths (tree.tree_paths)
    pseudo    pseudo tokens under every node (as many as the tree is deep, at most k), so
              whichever node ends up last accepted already has its drafts for the next step

Then the walk: from the root, the model chooses its own token at the next position from the
node's logits (argmax, or a draw keyed to (seed, position) exactly as in ar); when a child holds
that token the walk moves to it, otherwise the chosen token becomes the next root. The committed
tokens are therefore exactly what the model alone would produce, greedy or seeded sampling, and
their logprobs (when asked for) come from the node logits that chose them. The KV cache is cut
back to the prefix plus the walked nodes (compaction), and the drafts of the last walked node
seed the next tree.

The tree runs as one feed of the target's batched engine step (specdec/batch_forward.py: a feed
with a tree mask and pseudo tokens from layer L on), beside other sessions' verify windows.
"""

from __future__ import annotations

import torch

from specdec.acceptance import choose
from specdec.answers import StepTiming, Verdict
from specdec.batch_forward import Pseudo
from specdec.checks import ProtocolError, check_prompt
from specdec.engine import Engine
from specdec.logprobs import token_logprobs
from specdec.sampling import Sampling
from specdec.scheduler import WorkKind
from target_service.hidden_transfer.layers import TransferLayers
from target_service.hidden_transfer.tree import tree_masks
from target_service.verifier import check_logprobs


class HiddenTransferSession:
    def __init__(self, engine: Engine, transfer: TransferLayers,
                 paths: list[tuple[int, ...]], prompt_ids: list[int], max_positions: int,
                 sampling: Sampling = Sampling(), logprobs: int | None = None):
        if not engine.batched:
            raise ValueError("hidden transfer runs on the batched engine: Llama-family models "
                             f"only, not {engine.model.config.model_type}")
        check_prompt(prompt_ids, engine.model.config.vocab_size, max_positions)
        if transfer.k < max((len(p) for p in paths), default=0):
            raise ValueError(f"tree paths reach depth {max(len(p) for p in paths)}; "
                             f"the transfer layers draft k={transfer.k}")
        self.transfer, self.paths = transfer, paths
        self.k = max((len(p) for p in paths), default=1)  # pseudo tokens the tree needs
        check_logprobs(logprobs)
        self.max_positions = max_positions
        self.sampling = sampling
        self.logprobs = logprobs  # None, or top alternatives per committed token's logprob
        self.seq = engine.sequence(prompt_ids, WorkKind.VERIFY)
        self.ids = self.seq.ids  # committed; ids[-1] is the root (not fed yet) once started
        self.drafts: torch.Tensor | None = None  # [k, vocab]: the root's draft logits
        self.started = False

    def close(self) -> None:
        self.seq.close()

    def start(self, first_token: bool = True) -> Verdict:
        if not first_token:
            raise ProtocolError("start.hidden_transfer needs start.first_token: the target "
                                "chooses every token itself")
        return self.prefill()

    def verify(self, position: int, draft: list[int], qs, bonus: bool, held: bool) -> Verdict:
        """A window of a Hidden Transfer session: no draft tokens, one tree step."""
        if draft or qs or held:
            raise ProtocolError("a hidden-transfer session drafts for itself: window.draft_ids, "
                                "window.q and window.held must be empty")
        if position != len(self.ids):
            raise ProtocolError(
                f"window.position={position} but the committed length is {len(self.ids)}")
        return self.step()

    def prefill(self) -> Verdict:
        """Prefill the prompt, its last token as a lone root with pseudo tokens under it;
        choose the first token."""
        if self.started:
            raise ProtocolError("start sent twice on one stream")
        n = len(self.ids)
        fill = self.seq.fill(n - 1) if n > 1 else None  # plain (chunked) prefill of the rest
        position = len(self.ids)
        v = self._tree_step([], first=True)  # the root alone: the prompt's last token
        if fill is not None:
            v.step.forward_ns += fill.forward_ns
            v.step.queue_ns += fill.queue_ns
            v.step.input_tokens += fill.input_tokens
            v.step.cached_tokens = fill.reused
        v.position = position
        self.started = True
        return v

    def step(self) -> Verdict:
        """One forward over the tree under the root; commit the walked path and the next token."""
        if not self.started:
            raise ProtocolError("step before start")
        root_pos = len(self.ids) - 1
        if root_pos >= self.max_positions - 1:
            raise ProtocolError(f"the sequence has reached the model's {self.max_positions} "
                                "positions")
        depth_room = self.max_positions - 1 - root_pos  # nodes must stay inside the context
        return self._tree_step([p for p in self.paths if len(p) <= depth_room])

    @torch.inference_mode()
    def _tree_step(self, paths: list[tuple[int, ...]], first: bool = False) -> Verdict:
        root_pos = len(self.ids) - 1
        tokens, parents, depths = self._tree(paths)
        n, k, P = len(tokens), self.k, self.seq.cached
        low, high = tree_masks(parents, P, list(range(n)), k)
        # one LM-head pass for every node and every pseudo token: the walk needs the nodes',
        # the next tree the walked node's pseudo tokens' (the head is the costliest matrix)
        keep = list(range(n * (1 + k)))
        f = self.seq.tree(tokens, [P + d for d in depths], low, keep,
                          Pseudo(self.transfer, list(range(n)), k, high), prefill=first)
        node_logits, pseudo_logits = f.logits[:n], f.logits[n:].view(n, k, -1)

        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for j in range(1, n):
            children.setdefault((parents[j], tokens[j]), j)
        node, walked, accepted = 0, [0], []
        while True:
            token = choose(node_logits[node], self.sampling, root_pos + depths[node] + 1)
            child = children.get((node, token))
            if child is None:
                break
            node = child
            walked.append(node)
            accepted.append(token)
        self.seq.compact(walked)
        position = len(self.ids)
        self.ids.extend(accepted + [token])
        self.drafts = pseudo_logits[node]
        drafted = max((len(p) for p in paths), default=0)
        v = Verdict(position, drafted, len(accepted), token, len(self.ids), StepTiming.of(f),
                    accepted_ids=accepted)
        v.step.input_tokens = n * (1 + k)  # every node and its pseudo tokens
        if self.logprobs is not None:  # each walked node's logits chose the next token
            v.logprobs = token_logprobs(node_logits[walked], accepted + [token], self.sampling,
                                        self.logprobs)
        return v

    def _tree(self, paths: list[tuple[int, ...]]) -> tuple[list[int], list[int], list[int]]:
        """Tokens, parent indices and depths of the root and one node per rank path."""
        need = max((r for p in paths for r in p), default=-1) + 1
        depth_max = max((len(p) for p in paths), default=0)
        top: list[list[int]] = []
        if depth_max:  # [depth, need] candidate ids from the root's draft distributions
            top = self.drafts[:depth_max].topk(need, dim=-1).indices.tolist()
        tokens, parents, depths = [self.ids[-1]], [-1], [0]
        index = {(): 0}
        for p in paths:  # shortest first, so a parent is always placed before its children
            index[p] = len(tokens)
            tokens.append(top[len(p) - 1][p[-1]])
            parents.append(index[p[:-1]])
            depths.append(len(p))
        return tokens, parents, depths
