"""Training the transfer layers by self-distillation, the model frozen (`pearl transfer train`).

Data: the model continues a set of prompts greedily (batched); every position of those texts is a
training row. Teacher: the model's own next-token distribution at each position, kept as its
top ``TEACHER_TOP`` probabilities plus the remaining mass (one bucket). Student: pseudo i of
position t (target_service/hidden_transfer/), run through layers L.. attending to the real tokens
<= t, whose LM-head distribution should match the teacher's at position t + i. Loss:
KL(teacher || student) over the kept ids and the rest bucket, averaged over rows.

The real tokens' keys/values above layer L and their layer-L states are computed once per text
(``prepare``); a training step runs only the pseudo rows.

Training runs the model's transformers modules directly (``run_layers`` over a ``TreeKV``), with
autograd through the pseudo rows; serving runs the same math as one row of the target's batched
engine (specdec/batch_forward.py). ``tree_forward`` is that tree step in transformers modules,
the reference the tests hold the tree attention to.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from target_service.hidden_transfer.layers import Transfer, TransferLayers
from target_service.hidden_transfer.tree import ancestors, tree_masks

TEACHER_TOP = 32  # teacher ids kept per position (the rest is one bucket)
RANKS = 8  # ranks counted in the rank-acceptance table


class TreeKV:
    """Per-layer K/V of the real tokens fed so far, plus whatever the last forward appended.

    Layers >= L also hold the pseudo tokens of the last forward; ``keep`` cuts every layer back
    to the committed prefix plus the accepted nodes (KV compaction). Duck-types the
    ``update(key, value, layer_idx)`` of transformers' caches, which is all a decoder layer calls.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # committed positions every layer holds

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key/value [1, kv_heads, new, head_dim]
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = key, value
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], key], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], value], dim=2)
        return self.k[layer_idx], self.v[layer_idx]

    def keep(self, nodes: list[int]) -> None:
        """Keep the committed prefix plus the given nodes of the last forward, in that order."""
        idx = None
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            if idx is None or idx.device != k.device:
                idx = torch.tensor(list(range(self.length)) + [self.length + n for n in nodes],
                                   device=k.device)
            self.k[layer] = k.index_select(2, idx)
            self.v[layer] = v.index_select(2, idx)
        self.length += len(nodes)


@dataclass
class TreeOut:
    """Final-norm hidden states of one forward; logits are taken on demand (``logits``)."""

    nodes: torch.Tensor  # [n, hidden]
    pseudo: torch.Tensor  # [len(pseudo_for), k, hidden]
    pseudo_for: list[int]  # node index of each pseudo group


def run_layers(model, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: TreeKV,
               layers: range) -> torch.Tensor:
    """Run decoder layers ``layers`` on h [1, rows, hidden] at ``positions`` [rows]."""
    pos = positions[None]
    rope = model.model.rotary_emb(h, pos)
    mask = mask[None, None].to(h.device)
    for i in layers:
        h = model.model.layers[i](h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                                  use_cache=True, position_embeddings=rope)
    return h


def tree_forward(model, transfer: TransferLayers, kv: TreeKV, tokens: list[int],
                 parents: list[int], depths: list[int], pseudo_for: list[int],
                 k: int | None = None) -> TreeOut:
    """One forward of the model over nodes ``tokens`` that continue the cached prefix.

    Node j sits at position kv.length + depths[j] and attends to the prefix and its ancestors;
    the nodes in ``pseudo_for`` also get k pseudo tokens at layer L, at positions node + 1..k.
    Prefill is the chain case (parents j-1, depths j, pseudo for the last node only). ``k``
    (default: all of the layers' k) computes only the first k pseudo tokens: a tree that never
    goes deeper than k needs no more.
    """
    dev = next(model.parameters()).device
    n, L = len(tokens), transfer.layer
    k = transfer.k if k is None else k
    prefix = kv.length
    low, high = tree_masks(parents, prefix, pseudo_for, k)
    pos = torch.tensor([prefix + d for d in depths], device=dev)
    h = model.model.embed_tokens(torch.tensor([tokens], device=dev))  # [1, n, hidden]
    h = run_layers(model, h, pos, low, kv, range(L))
    pseudo = transfer(h[0, pseudo_for])[:, :k].reshape(1, -1, h.shape[-1])  # [1, g*k, hidden]
    offsets = torch.arange(1, k + 1, device=dev)
    ppos = (pos[pseudo_for][:, None] + offsets).reshape(-1)
    h = run_layers(model, torch.cat([h, pseudo], dim=1), torch.cat([pos, ppos]), high, kv,
                   range(L, model.config.num_hidden_layers))
    h = model.model.norm(h[0])
    return TreeOut(h[:n], h[n:].reshape(len(pseudo_for), k, -1), pseudo_for)


def logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM head on final-norm hidden states h [..., hidden] -> float32 logits [..., vocab]."""
    return model.lm_head(h).float()


@dataclass
class Text:
    """One training text with what the frozen model computed on it."""

    ids: list[int]
    h: torch.Tensor  # [T, hidden] layer-L inputs
    keys: list[torch.Tensor]  # per layer >= L: [1, kv_heads, T, head_dim]
    values: list[torch.Tensor]
    top_ids: torch.Tensor  # [T, TEACHER_TOP] teacher's top ids at each position
    top_p: torch.Tensor  # [T, TEACHER_TOP] their probabilities (float32)


@torch.inference_mode()
def self_generate(model, prompts: list[list[int]], new_tokens: int, batch: int, pad_id: int,
                  progress: bool = True) -> list[list[int]]:
    """Greedy continuations of ``prompts`` by the model itself, left-padded batches."""
    out: list[list[int]] = []
    dev = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc="self-generating", disable=not progress, unit="text")
    for b in range(0, len(prompts), batch):
        group = prompts[b : b + batch]
        width = max(map(len, group))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=dev)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        for p, row in zip(group, gen.tolist()):
            out.append(p + row[width:])
        bar.update(len(group))
    bar.close()
    return out


@torch.no_grad()  # not inference_mode: its tensors feed the autograd of training
def prepare(model, layer: int, ids: list[int]) -> Text:
    """Run the frozen model once over ``ids``: layer-L states, upper K/V, teacher top ids."""
    dev = next(model.parameters()).device
    n = len(ids)
    kv = TreeKV(model.config.num_hidden_layers)
    causal = torch.cat([torch.zeros(n, 0, dtype=torch.bool), ancestors(list(range(-1, n - 1)))], 1)
    pos = torch.arange(n, device=dev)
    h = model.model.embed_tokens(torch.tensor([ids], device=dev))
    h = run_layers(model, h, pos, causal, kv, range(layer))
    h_layer = h[0].clone()
    h = run_layers(model, h, pos, causal, kv, range(layer, model.config.num_hidden_layers))
    p = torch.softmax(logits(model, model.model.norm(h[0])), dim=-1)
    top_p, top_ids = p.topk(TEACHER_TOP, dim=-1)
    upper = range(layer, model.config.num_hidden_layers)
    return Text(ids, h_layer, [kv.k[i] for i in upper], [kv.v[i] for i in upper], top_ids, top_p)


def rows_for(text: Text, k: int, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-row positions [S*k] and the attention mask [S*k, T + S*k] for ``positions``."""
    T, S = len(text.ids), len(positions)
    t = torch.tensor(positions)
    ppos = (t[:, None] + torch.arange(1, k + 1)).reshape(-1)
    mask = torch.zeros(S * k, T + S * k, dtype=torch.bool)
    mask[:, :T] = torch.arange(T)[None] <= t.repeat_interleave(k)[:, None]  # real tokens <= t
    causal = torch.tril(torch.ones(k, k, dtype=torch.bool))
    for s in range(S):
        mask[s * k : (s + 1) * k, T + s * k : T + (s + 1) * k] = causal
    return ppos, mask


def student(model, transfer: TransferLayers, text: Text, positions: list[int]) -> torch.Tensor:
    """Student log-probabilities [S*k, vocab] (float32) of the pseudo rows of ``positions``."""
    ppos, mask = rows_for(text, transfer.k, positions)
    dev = text.h.device
    kv = TreeKV(model.config.num_hidden_layers)
    for j, i in enumerate(range(transfer.layer, model.config.num_hidden_layers)):
        kv.k[i], kv.v[i] = text.keys[j], text.values[j]
    pseudo = transfer(text.h[positions]).reshape(1, -1, text.h.shape[-1])  # [1, S*k, hidden]
    h = run_layers(model, pseudo, ppos.to(dev), mask, kv,
                range(transfer.layer, model.config.num_hidden_layers))
    return torch.log_softmax(logits(model, model.model.norm(h[0])), dim=-1)


def kl_loss(logq: torch.Tensor, text: Text, positions: list[int], k: int) -> torch.Tensor:
    """Mean KL(teacher || student) over the rows; teacher row of (t, i) is position t + i."""
    at = (torch.tensor(positions)[:, None] + torch.arange(1, k + 1)).reshape(-1)
    ids, p = text.top_ids[at], text.top_p[at]  # [rows, TOP]
    lq = logq.gather(1, ids.to(logq.device))
    rest_p = (1 - p.sum(-1)).clamp_min(1e-9)
    rest_q = (1 - lq.exp().sum(-1)).clamp_min(1e-9)
    kl = (p * (p.clamp_min(1e-12).log() - lq)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())
    return kl.mean()


def positions_of(text: Text, k: int) -> list[int]:
    """Every t whose k pseudo rows all have a teacher row (t + k < T)."""
    return list(range(len(text.ids) - k))


@torch.no_grad()
def evaluate(model, transfer: TransferLayers, texts: list[Text]) -> tuple[float, list[list[float]]]:
    """Mean KL on ``texts`` and rank_acceptance[d][r]: how often the model's own token at depth
    d+1 (the teacher's argmax) is the student's rank-r candidate."""
    k = transfer.k
    total, rows = 0.0, 0
    counts = [[0] * RANKS for _ in range(k)]
    for text in texts:
        pos = positions_of(text, k)
        for c in range(0, len(pos), 64):
            chunk = pos[c : c + 64]
            logq = student(model, transfer, text, chunk)
            total += float(kl_loss(logq, text, chunk, k)) * len(chunk) * k
            rows += len(chunk) * k
            at = (torch.tensor(chunk)[:, None] + torch.arange(1, k + 1)).reshape(-1)
            own = text.top_ids[at, 0].to(logq.device)
            ranks = (logq > logq.gather(1, own[:, None])).sum(-1).view(len(chunk), k)
            for d in range(k):
                for r in ranks[:, d].tolist():
                    if r < RANKS:
                        counts[d][r] += 1
    n = max(1, rows // k)
    return total / max(1, rows), [[c / n for c in row] for row in counts]


def train(loaded, prompts: list[list[int]], layer: int, k: int, rank: int, *,
          new_tokens: int = 64, epochs: int = 2, rows_per_step: int = 64, lr: float = 2e-3,
          held_out: float = 0.15, batch: int = 8, seed: int = 0, progress: bool = True,
          corpus: Path | None = None) -> Transfer:
    """Self-generate, prepare, train; returns the layers with their held-out measurements.

    ``corpus``: a JSON file of the self-generated texts, reused when it was written for the same
    prompts and length (it does not depend on the layer, k or rank), written otherwise."""
    model = loaded.model
    n_layers = model.config.num_hidden_layers
    if not 0 < layer < n_layers:
        raise ValueError(f"layer must be in 1..{n_layers - 1} for this model, got {layer}")
    if k < 1 or rank < 1:
        raise ValueError(f"k and rank must be >= 1, got k={k} rank={rank}")
    if len(prompts) < 2:
        raise ValueError("training needs at least two prompts (one is held out)")
    for p in model.parameters():
        p.requires_grad_(False)
    t_start = time.monotonic()
    texts_ids = corpus_texts(loaded, prompts, new_tokens, batch, corpus, progress)
    t_gen = time.monotonic() - t_start
    texts = [prepare(model, layer, ids) for ids in tqdm(texts_ids, desc="teacher pass",
                                                        disable=not progress, unit="text")]
    rng = random.Random(seed)
    rng.shuffle(texts)
    n_held = max(1, round(len(texts) * held_out))
    held, train_set = texts[:n_held], texts[n_held:]

    torch.manual_seed(seed)
    transfer = TransferLayers(model.config.hidden_size, layer, k, rank).to(loaded.device)
    kl_before, _ = evaluate(model, transfer, held)
    steps = fit(model, transfer, train_set, rng, epochs, rows_per_step, lr, progress)
    kl_after, acc = evaluate(model, transfer, held)
    info = {"prompts": len(prompts), "new_tokens": new_tokens, "train_texts": len(train_set),
            "held_out_texts": len(held), "train_tokens": sum(len(t.ids) for t in train_set),
            "epochs": epochs, "steps": steps, "lr": lr,
            "held_out_kl_before": kl_before, "held_out_kl_after": kl_after,
            "generate_s": round(t_gen, 1), "total_s": round(time.monotonic() - t_start, 1),
            "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch.")}
    return Transfer(transfer.eval(), loaded.name, acc, info)


def corpus_texts(loaded, prompts: list[list[int]], new_tokens: int, batch: int,
                 corpus: Path | None, progress: bool) -> list[list[int]]:
    """The self-generated texts: read from ``corpus`` when it holds these prompts at this length,
    else generated (and written there)."""
    pad = loaded.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    key = {"model": loaded.name, "prompts": prompts, "new_tokens": new_tokens}
    cached = json.loads(corpus.read_text()) if corpus and corpus.is_file() else {}
    if cached.get("key") == key:
        return cached["texts"]
    texts_ids = self_generate(loaded.model, prompts, new_tokens, batch, pad, progress)
    if corpus:
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text(json.dumps({"key": key, "texts": texts_ids}))
    return texts_ids


def fit(model, transfer: TransferLayers, train_set: list[Text], rng: random.Random, epochs: int,
        rows_per_step: int, lr: float, progress: bool) -> int:
    """Adam with a one-cycle schedule over shuffled chunks of pseudo rows; returns the steps."""
    k = transfer.k
    opt = torch.optim.Adam(transfer.parameters(), lr=lr)
    steps = epochs * sum(math.ceil(len(positions_of(text, k)) / rows_per_step)
                         for text in train_set)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps),
                                                pct_start=0.1)
    bar = tqdm(total=steps, desc=f"training L{transfer.layer} k{k} r{transfer.rank}",
               disable=not progress, unit="step")
    for _ in range(epochs):
        order = list(range(len(train_set)))
        rng.shuffle(order)
        for i in order:
            text = train_set[i]
            pos = positions_of(text, k)
            rng.shuffle(pos)
            for c in range(0, len(pos), rows_per_step):
                chunk = sorted(pos[c : c + rows_per_step])
                loss = kl_loss(student(model, transfer, text, chunk), text, chunk, k)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(kl=f"{loss.item():.3f}")
    bar.close()
    return steps
