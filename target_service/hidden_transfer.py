"""One Hidden Transfer session: the target decodes alone, drafting for itself (transfer.py).

Each step is one forward pass over a token tree:

    root      the token chosen last step (committed, not yet fed), at position p
    nodes     candidates for p+1 .. p+k from the root's draft distributions, shaped by the
              session's rank paths (transfer.tree_paths)
    pseudo    pseudo tokens under every node (as many as the tree is deep, at most k), so
              whichever node ends up last accepted already has its drafts for the next step

Then the walk: from the root, the model chooses its own token at the next position from the
node's logits (argmax, or a draw keyed to (seed, position) exactly as in ar); when a child holds
that token the walk moves to it, otherwise the chosen token becomes the next root. The committed
tokens are therefore exactly what the model alone would produce, greedy or seeded sampling. The
KV cache is cut back to the prefix plus the walked nodes (compaction), and the drafts of the
last walked node seed the next tree.
"""

from __future__ import annotations

import time
import torch

from specdec.acceptance import choose
from specdec.kv import ProtocolError, check_prompt
from specdec.sampling import Sampling
from target_service.transfer import TransferLayers, TreeKV, logits, tree_forward
from target_service.verifier import Verdict


class HiddenTransferSession:
    def __init__(self, model: torch.nn.Module, transfer: TransferLayers,
                 paths: list[tuple[int, ...]], prompt_ids: list[int], max_positions: int,
                 sampling: Sampling = Sampling()):
        check_prompt(prompt_ids, model.config.vocab_size, max_positions)
        if transfer.k < max((len(p) for p in paths), default=0):
            raise ValueError(f"tree paths reach depth {max(len(p) for p in paths)}; "
                             f"the transfer layers draft k={transfer.k}")
        self.model, self.transfer, self.paths = model, transfer, paths
        self.k = max((len(p) for p in paths), default=1)  # pseudo tokens the tree needs
        self.max_positions = max_positions
        self.sampling = sampling
        self.ids = list(prompt_ids)  # committed; ids[-1] is the root once started
        self.kv = TreeKV(model.config.num_hidden_layers)
        self.drafts: torch.Tensor | None = None  # [k, hidden]: the root's pseudo states
        self.started = False

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

    @torch.inference_mode()
    def prefill(self) -> Verdict:
        """Prefill the prompt with pseudo tokens under its last token; choose the first token."""
        if self.started:
            raise ProtocolError("start sent twice on one stream")
        n = len(self.ids)
        clock = Clock()
        out = self._forward(self.ids, list(range(-1, n - 1)), list(range(n)), [n - 1])
        self.kv.keep(list(range(n)))
        token = choose(logits(self.model, out.nodes[-1]), self.sampling, n)
        self.ids.append(token)
        self.drafts = out.pseudo[0]
        self.started = True
        return Verdict(n, 0, 0, token, len(self.ids), *clock.stop(out.nodes, n + self.k))

    @torch.inference_mode()
    def step(self) -> Verdict:
        """One forward over the tree under the root; commit the walked path and the next token."""
        if not self.started:
            raise ProtocolError("step before start")
        root_pos = len(self.ids) - 1
        if root_pos >= self.max_positions - 1:
            raise ProtocolError(f"the sequence has reached the model's {self.max_positions} "
                                "positions")
        depth_room = self.max_positions - 1 - root_pos  # nodes must stay inside the context
        paths = [p for p in self.paths if len(p) <= depth_room]
        clock = Clock()  # the step's time: the LM-head passes around the forward count too
        tokens, parents, depths = self._tree(paths)
        out = self._forward(tokens, parents, depths, list(range(len(tokens))))
        # one LM-head pass for every node the walk may visit: the head reads the largest matrix
        # of the model, and a pass per visited node cost ~30 ms each on one CPU thread
        node_logits = logits(self.model, out.nodes)  # [n, vocab]

        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for j in range(1, len(tokens)):
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
        self.kv.keep(walked)
        position = len(self.ids)
        self.ids.extend(accepted + [token])
        self.drafts = out.pseudo[node]
        drafted = max((len(p) for p in paths), default=0)
        fed = len(tokens) * (1 + self.k)  # every node and its pseudo tokens
        return Verdict(position, drafted, len(accepted), token, len(self.ids),
                       *clock.stop(node_logits, fed), accepted_ids=accepted)

    def _tree(self, paths: list[tuple[int, ...]]) -> tuple[list[int], list[int], list[int]]:
        """Tokens, parent indices and depths of the root and one node per rank path."""
        need = max((r for p in paths for r in p), default=-1) + 1
        depth_max = max((len(p) for p in paths), default=0)
        top: list[list[int]] = []
        if depth_max:  # [depth, need] candidate ids from the root's draft distributions
            top = logits(self.model, self.drafts[:depth_max]).topk(need, dim=-1).indices.tolist()
        tokens, parents, depths = [self.ids[-1]], [-1], [0]
        index = {(): 0}
        for p in paths:  # shortest first, so a parent is always placed before its children
            index[p] = len(tokens)
            tokens.append(top[len(p) - 1][p[-1]])
            parents.append(index[p[:-1]])
            depths.append(len(p))
        return tokens, parents, depths

    def _forward(self, tokens, parents, depths, pseudo_for):
        return tree_forward(self.model, self.transfer, self.kv, tokens, parents, depths,
                            pseudo_for, self.k)


class Clock:
    """The duration of one step as the Verdict reports it: (forward_ns, started_unix_ns, fed)."""

    def __init__(self):
        self.started_unix_ns = time.time_ns()
        self.t0 = time.perf_counter_ns()

    def stop(self, last: torch.Tensor, fed: int) -> tuple[int, int, int]:
        if last.device.type == "cuda":  # the step's kernels must be done before the clock stops
            torch.cuda.synchronize(last.device)
        return time.perf_counter_ns() - self.t0, self.started_unix_ns, fed
