"""`pearl transfer train|show`: train Hidden Transfer layers for a model, or show a trained file.

Training prompts are HumanEval problems from index 40 on (`pearl bench` and `pearl demo` use the
first ones), continued greedily by the model itself; see pearl/transfer_train.py.
"""

import json
import sys
import time
from pathlib import Path

from specdec.defaults import DEFAULT_DTYPE, DEFAULT_MODELS, DTYPES

FIRST_TRAIN_PROMPT = 40  # bench and demo prompts come before this index
SWEEP_KV_TOKENS = 16_384  # the sweep's engine: one session at a time


def add_transfer(sub) -> None:
    p = sub.add_parser("transfer", help="train or show Hidden Transfer layers")
    p.add_argument("action", choices=["train", "show", "sweep"])
    p.add_argument("--model", default=DEFAULT_MODELS["target"])
    p.add_argument("--layer", type=int, default=None,
                   help="decoder layer whose input the maps read (default: half the depth; "
                        "docs/hidden-transfer.md: the sweep)")
    p.add_argument("--k", type=int, default=3, help="future positions drafted per forward")
    p.add_argument("--rank", type=int, default=128, help="rank of each transfer map")
    p.add_argument("--prompts", type=int, default=64, help="training prompts (HumanEval 40..)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="weights file (default: next to the model's cache)")
    p.add_argument("--file", action="append",
                   help="show/sweep: weights file (repeatable; default: the model's own)")
    p.add_argument("--nodes", default="0,3,6,10,16",
                   help="sweep: tree sizes (candidate nodes; 0 = no drafts, plain decoding)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="sweep: tokens per prompt")
    p.add_argument("--json", help="sweep: also write the rows here")
    p.set_defaults(fn=cmd_transfer)


def cmd_transfer(a) -> None:
    from target_service.hidden_transfer.layers import Transfer, default_path, find

    if a.action == "sweep":
        return sweep(a)
    if a.action == "show":
        path = Path(a.file[0]) if a.file else find(a.model)
        if path is None:
            sys.exit(f"pearl transfer show: no transfer layers for {a.model}; "
                     "run `pearl transfer train` (or `make transfer`)")
        t = Transfer.load(path)
        print(f"{path}\nmodel {t.model}  layer {t.layers.layer}  k {t.layers.k}  "
              f"rank {t.layers.rank}")
        print(json.dumps(t.info, indent=1))
        print(acceptance_table(t.rank_acceptance))
        return

    from pearl.demo import humaneval_prompt
    from specdec.models import load_model
    from pearl.transfer_train import train

    t0 = time.monotonic()
    loaded = load_model(a.model, device=a.device, dtype=a.dtype, threads=a.threads)
    layer = a.layer if a.layer is not None else loaded.model.config.num_hidden_layers // 2
    first, last = FIRST_TRAIN_PROMPT, FIRST_TRAIN_PROMPT + a.prompts
    prompts = [loaded.tokenizer.encode(humaneval_prompt(i)) for i in range(first, last)]
    corpus = default_path(a.model).with_suffix(f".corpus-{first}-{last}-{a.new_tokens}.json")
    t = train(loaded, prompts, layer, a.k, a.rank, new_tokens=a.new_tokens, epochs=a.epochs,
              lr=a.lr, batch=a.batch, corpus=corpus)
    t.info["humaneval_prompts"] = f"{first}..{last - 1}"
    out = Path(a.out) if a.out else default_path(a.model)
    t.save(out)
    info = t.info
    print(f"\nsaved {out} ({out.stat().st_size / 1e6:.1f} MB)")
    print(f"layer {layer}  k {a.k}  rank {a.rank}  {info['train_tokens']} training tokens, "
          f"{info['steps']} steps; {time.monotonic() - t0:.0f} s in all "
          f"({info['generate_s']:.0f} s generating) on {a.device} {a.dtype}")
    print(f"held-out KL {info['held_out_kl_before']:.3f} -> {info['held_out_kl_after']:.3f}")
    print(acceptance_table(t.rank_acceptance))


def sweep(a) -> None:
    """Decode HumanEval prompts 0.. in this process with each file and tree size; compare with
    plain greedy decoding on the same thread."""
    from pearl.demo import humaneval_prompt
    from pearl.report import table
    from specdec.engine import Engine
    from specdec.models import load_model
    from target_service.hidden_transfer.layers import Transfer, find
    from target_service.hidden_transfer.session import HiddenTransferSession
    from target_service.hidden_transfer.tree import tree_paths

    files = [Path(f) for f in a.file] if a.file else [find(a.model)]
    if None in files:
        sys.exit(f"pearl transfer sweep: no transfer layers for {a.model}")
    loaded = load_model(a.model, device=a.device, dtype=a.dtype, threads=a.threads or 1)
    engine = Engine(loaded.model, SWEEP_KV_TOKENS, name="sweep")
    prompts = [loaded.tokenizer.encode(humaneval_prompt(i)) for i in range(a.prompts)]
    ar = ar_rate(loaded, prompts, a.max_new_tokens)
    print(f"ar (plain greedy decoding, KV cache, same thread): {ar:.2f} tok/s", flush=True)
    rows = []
    for path in files:
        t = Transfer.load(path)
        t.layers.to(loaded.device, loaded.dtype)
        for nodes in [int(x) for x in a.nodes.split(",")]:
            paths = tree_paths(t.rank_acceptance, nodes, t.layers.k) if nodes else []
            warm = HiddenTransferSession(engine, t.layers, paths, prompts[0], 1 << 20)
            warm.start()
            for _ in range(3):  # first-call costs of these shapes, not timed
                warm.step()
            n_tok = n_fwd = 0
            wall = fwd_ns = 0.0
            by_depth = [[0, 0] for _ in range(t.layers.k)]
            for ids in prompts:
                s = HiddenTransferSession(engine, t.layers, paths, ids, 1 << 20)
                t0 = time.perf_counter()
                s.start()
                while len(s.ids) - len(ids) < a.max_new_tokens:
                    v = s.step()
                    n_fwd += 1
                    fwd_ns += v.step.forward_ns
                    for d in range(v.verified):
                        by_depth[d][0] += v.accepted > d
                        by_depth[d][1] += 1
                wall += time.perf_counter() - t0
                n_tok += len(s.ids) - len(ids) - 1  # after the prefill's token
            tps = n_tok / wall
            rows.append({
                "file": path.name, "layer": t.layers.layer, "k": t.layers.k, "nodes": nodes,
                "tokens_per_s": round(tps, 2), "speedup_vs_ar": round(tps / ar, 2),
                "tokens_per_forward": round(n_tok / max(1, n_fwd), 2),
                "ms_per_forward": round(fwd_ns / max(1, n_fwd) / 1e6, 1),
                "acceptance_by_depth": [round(x / n, 3) if n else None for x, n in by_depth]})
            print(rows[-1], flush=True)
    engine.close()
    cols = [(k, k, "{}") for k in rows[0]]
    print(table(rows, cols))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def ar_rate(loaded, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of plain greedy decoding with a KV cache (after the first token, like sweep)."""
    from specdec.sequence import HFSequence

    def run(ids: list[int], n: int) -> tuple[int, float]:
        seq = HFSequence(loaded.model, ids)
        seq.extend([int(seq.forward().logits[-1].argmax())])
        t0 = time.perf_counter()
        while len(seq) - len(ids) < n:
            seq.extend([int(seq.forward().logits[-1].argmax())])
        return n - 1, time.perf_counter() - t0

    run(prompts[0], 4)  # warm-up
    done = [run(ids, new_tokens) for ids in prompts]
    return sum(n for n, _ in done) / sum(w for _, w in done)


def acceptance_table(acc: list[list[float]]) -> str:
    """rank_acceptance as text: one row per depth, one column per candidate rank."""
    if not acc:
        return "(no held-out measurements)"
    head = "depth  " + " ".join(f"r{r:<5d}" for r in range(len(acc[0]))) + " top-1..all"
    rows = [f"{d + 1:<6d} " + " ".join(f"{x:6.3f}" for x in row) + f" {sum(row):.3f}"
            for d, row in enumerate(acc)]
    return "held-out rank acceptance (model's own token is the rank-r candidate)\n" + \
        "\n".join([head, *rows])
