"""`pearl transfer train|show`: train Hidden Transfer layers for a model, or show a trained file.

Training prompts are HumanEval problems from index 40 on (`pearl bench` and `pearl demo` use the
first ones), continued greedily by the model itself; see target_service/transfer_train.py.
"""

import json
import sys
import time
from pathlib import Path

from pearl.demo import humaneval_prompt

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
FIRST_TRAIN_PROMPT = 40  # bench and demo prompts come before this index


def add_transfer(sub) -> None:
    p = sub.add_parser("transfer", help="train or show Hidden Transfer layers")
    p.add_argument("action", choices=["train", "show"])
    p.add_argument("--model", default=DEFAULT_TARGET)
    p.add_argument("--layer", type=int, default=None,
                   help="decoder layer whose input the maps read (default: 3/4 of the depth)")
    p.add_argument("--k", type=int, default=3, help="future positions drafted per forward")
    p.add_argument("--rank", type=int, default=128, help="rank of each transfer map")
    p.add_argument("--prompts", type=int, default=64, help="training prompts (HumanEval 40..)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="weights file (default: next to the model's cache)")
    p.add_argument("--file", help="show: the weights file (default: the model's default one)")
    p.set_defaults(fn=cmd_transfer)


def cmd_transfer(a) -> None:
    from target_service.transfer import Transfer, default_path, find

    if a.action == "show":
        path = Path(a.file) if a.file else find(a.model)
        if path is None:
            sys.exit(f"pearl transfer show: no transfer layers for {a.model}; "
                     "run `pearl transfer train` (or `make transfer`)")
        t = Transfer.load(path)
        print(f"{path}\nmodel {t.model}  layer {t.layers.layer}  k {t.layers.k}  "
              f"rank {t.layers.rank}")
        print(json.dumps(t.info, indent=1))
        print(acceptance_table(t.rank_acceptance))
        return

    from specdec.models import load_model
    from target_service.transfer_train import train

    t0 = time.monotonic()
    loaded = load_model(a.model, device=a.device, dtype=a.dtype, threads=a.threads)
    layer = a.layer if a.layer is not None else loaded.model.config.num_hidden_layers * 3 // 4
    first, last = FIRST_TRAIN_PROMPT, FIRST_TRAIN_PROMPT + a.prompts
    prompts = [loaded.tokenizer.encode(humaneval_prompt(i)) for i in range(first, last)]
    t = train(loaded, prompts, layer, a.k, a.rank, new_tokens=a.new_tokens, epochs=a.epochs,
              lr=a.lr, batch=a.batch)
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


def acceptance_table(acc: list[list[float]]) -> str:
    """rank_acceptance as text: one row per depth, one column per candidate rank."""
    if not acc:
        return "(no held-out measurements)"
    head = "depth  " + " ".join(f"r{r:<5d}" for r in range(len(acc[0]))) + " top-1..all"
    rows = [f"{d + 1:<6d} " + " ".join(f"{x:6.3f}" for x in row) + f" {sum(row):.3f}"
            for d, row in enumerate(acc)]
    return "held-out rank acceptance (model's own token is the rank-r candidate)\n" + \
        "\n".join([head, *rows])
