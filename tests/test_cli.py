"""The `pearl` command's promises, through its real argument parser (pearl.cli.main) in this
process: `models list`, `transfer train` / `show` / `sweep` on a tiny model, plain streaming
`generate`, `generate --chat` with a chat template, and the TLS flags of `serve` and `generate`
turned into working TLS. The flags that only a service process has (--trace-file,
--metrics-port, SIGTERM and --grace) are tested on real processes in tests/test_processes.py."""

import copy
import json
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import Cluster
from conftest import greedy_reference
from pearl import cli
from pearl.client import Client
from specdec import model_store
from specdec.models import LoadedModel, tiny_loaded
from specdec.security import ClientTLS

# -- models list --------------------------------------------------------------------------------


def test_models_list_shows_every_registry_model_and_its_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEARL_CACHE_DIR", str(tmp_path))
    cli.main(["models", "list"])
    before = capsys.readouterr().out.splitlines()
    assert len(before) == len(model_store.REGISTRY)
    for name, line in zip(model_store.REGISTRY, before):
        assert line.split()[:2] == [name, "not"], line
        assert line.split()[-1] == str(tmp_path / name)
    first = next(iter(model_store.REGISTRY))
    (tmp_path / first).mkdir()
    (tmp_path / first / model_store.MARKER).write_text("")  # what a finished conversion leaves
    cli.main(["models", "list"])
    after = capsys.readouterr().out.splitlines()
    assert after[0].split()[:2] == [first, "cached"]
    assert after[1:] == before[1:]


# -- transfer train / show / sweep ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ht_folder(tmp_path_factory):
    """A tiny target, sharpened as in test_hidden_transfer.py, saved as a model folder."""
    loaded = tiny_loaded(5, num_layers=4)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(10)
    folder = tmp_path_factory.mktemp("ht-target")
    loaded.tokenizer.pad_token = "<unk>"  # else loading the folder adds a pad id past the vocab
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_transfer_train_show_and_sweep_tiny(ht_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEARL_CACHE_DIR", str(tmp_path / "cache"))  # the training corpus goes here
    out = tmp_path / "layers.safetensors"
    cli.main(["transfer", "train", "--model", str(ht_folder), "--layer", "2", "--k", "2",
              "--rank", "8", "--prompts", "3", "--new-tokens", "12", "--epochs", "2",
              "--batch", "3", "--dtype", "float32", "--threads", "1", "--out", str(out)])
    trained = capsys.readouterr().out
    assert f"saved {out}" in trained and "layer 2  k 2  rank 8" in trained
    assert "held-out KL" in trained and out.is_file()

    cli.main(["transfer", "show", "--file", str(out)])
    shown = capsys.readouterr().out
    assert "layer 2  k 2  rank 8" in shown and "held-out rank acceptance" in shown

    rows_file = tmp_path / "rows.json"
    cli.main(["transfer", "sweep", "--model", str(ht_folder), "--file", str(out),
              "--nodes", "0,3", "--prompts", "2", "--max-new-tokens", "10", "--dtype", "float32",
              "--json", str(rows_file)])
    assert "ar (plain greedy decoding" in capsys.readouterr().out
    rows = json.loads(rows_file.read_text())
    assert [(r["layer"], r["k"], r["nodes"]) for r in rows] == [(2, 2, 0), (2, 2, 3)]
    assert rows[0]["tokens_per_forward"] == 1.0  # no tree: one token per forward
    assert rows[1]["tokens_per_forward"] >= 1.0 and len(rows[1]["acceptance_by_depth"]) == 2


# -- generate: plain streaming and --chat -------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_target(tiny_target) -> LoadedModel:
    """tiny_target with a chat template on a tokenizer of its own."""
    tok = copy.deepcopy(tiny_target.tokenizer)
    tok.chat_template = TEMPLATE
    return LoadedModel(tiny_target.name, tiny_target.model, tok, tiny_target.device,
                       tiny_target.dtype)


@pytest.fixture(scope="module")
def chat_cluster(tiny_draft, chat_target):
    c = Cluster(tiny_draft, chat_target)
    yield c
    c.close()


class Recorder:
    """sys.stdout that remembers what each flush pushed out."""

    def __init__(self):
        self.pending, self.flushed = [], []

    def write(self, s):
        self.pending.append(s)
        return len(s)

    def flush(self):
        if self.pending:
            self.flushed.append("".join(self.pending))
            self.pending = []


def test_generate_streams_plain_text_then_the_statistics(chat_cluster, tiny_target, monkeypatch):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    cli.main(["generate", "def f(x):", "--coordinator", chat_cluster.address, "--mode", "pearl",
              "--max-new-tokens", "24", "--ignore-eos"])
    out.flush()
    ids = tiny_target.tokenizer.encode("def f(x):")
    text = tiny_target.tokenizer.decode(greedy_reference(tiny_target, ids, 24))
    # the text arrives piece by piece, each piece flushed as it is committed, then the statistics
    stats_at = next(i for i, s in enumerate(out.flushed) if s.startswith("\n"))
    pieces = out.flushed[:stats_at]
    assert len(pieces) >= 2, out.flushed
    assert "".join(pieces) == text
    rest = "".join(out.flushed[stats_at:])
    assert "new_tokens" in rest and "24" in rest and "acceptance" in rest
    assert not rest.lstrip().startswith("{")  # plain text, not the --json object


def test_generate_chat_applies_the_template(chat_cluster, chat_target, tiny_target, capsys):
    cli.main(["generate", "hello", "--coordinator", chat_cluster.address, "--chat", "--mode",
              "pearl", "--max-new-tokens", "12", "--ignore-eos", "--json"])
    got = json.loads(capsys.readouterr().out)
    templated = chat_target.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True,
        return_dict=False)
    assert chat_target.tokenizer.decode(templated) == "<user>hello\n<assistant>"
    assert got["prompt_tokens"] == len(templated)
    assert got["token_ids"] == greedy_reference(tiny_target, list(templated), 12)
    plain = greedy_reference(tiny_target, tiny_target.tokenizer.encode("hello"), 12)
    assert got["token_ids"] != plain  # the template made a difference


def test_generate_sends_a_conversation_and_prints_logprobs(chat_cluster, chat_target,
                                                           tiny_target, tmp_path, capsys):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = tmp_path / "turns.json"
    path.write_text(json.dumps(turns))
    cli.main(["generate", "again", "--coordinator", chat_cluster.address, "--system", "terse",
              "--messages", str(path), "--max-new-tokens", "6", "--ignore-eos", "--json",
              "--logprobs", "2"])
    got = json.loads(capsys.readouterr().out)
    conversation = [{"role": "system", "content": "terse"}, *turns,
                    {"role": "user", "content": "again"}]
    ids = list(chat_target.tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert got["prompt_tokens"] == len(ids)
    assert got["token_ids"] == greedy_reference(tiny_target, ids, 6)
    assert [lp["token_id"] for lp in got["logprobs"]] == got["token_ids"]
    assert all(len(lp["top"]) == 2 for lp in got["logprobs"])
    cli.main(["generate", "again", "--coordinator", chat_cluster.address, "--chat",
              "--max-new-tokens", "3", "--logprobs", "1"])
    out = capsys.readouterr().out
    assert "logprob" in out and len([ln for ln in out.splitlines() if ln[:4].strip().isdigit()]) >= 3
    path.write_text('{"role": "user"}')
    with pytest.raises(SystemExit, match="want a JSON list"):
        cli.main(["generate", "x", "--coordinator", chat_cluster.address, "--messages", str(path)])


# -- TLS flags through the parser -----------------------------------------------------------------


def parsed(argv: list[str], monkeypatch) -> object:
    """The namespace `pearl serve ...` hands to its command, without serving."""
    seen = []
    monkeypatch.setattr(cli, "cmd_serve", seen.append)
    cli.main(argv)
    return seen[0]


def test_tls_flags_of_serve_and_generate_make_working_tls(tiny_draft, tiny_target, tmp_path,
                                                           monkeypatch, capsys):
    from test_security import TOKEN, Pki

    good = Pki(tmp_path, "good")
    cert, key = good.issue("server", server=True)
    ccert, ckey = good.issue("coordinator")
    backend = parsed(["serve", "draft", "--tls-cert", cert, "--tls-key", key, "--tls-ca",
                      good.ca], monkeypatch)
    coord = parsed(["serve", "coordinator", "--target", "x:1", "--tls-cert", cert, "--tls-key",
                    key, "--backend-tls-ca", good.ca, "--backend-tls-cert", ccert,
                    "--backend-tls-key", ckey, "--auth-token", TOKEN], monkeypatch)
    kw_backend = cli.serve_kwargs(backend)
    kw_coord = cli.serve_kwargs(coord)
    c = Cluster(tiny_draft, tiny_target, draft_kw=kw_backend, target_kw=kw_backend,
                coordinator_kw={k: v for k, v in kw_coord.items()
                                if k in ("tls", "backend_tls", "auth_token")})
    try:
        cli.main(["generate", "abc", "--coordinator", c.address, "--tls-ca", good.ca,
                  "--auth-token", TOKEN, "--mode", "pearl", "--max-new-tokens", "6", "--json"])
        got = json.loads(capsys.readouterr().out)
        assert got["new_tokens"] == 6 and not got["fell_back"] and got["draft_tokens"] > 0
        with pytest.raises(SystemExit) as e:  # the token flag is what lets a client in
            cli.main(["generate", "abc", "--coordinator", c.address, "--tls-ca", good.ca,
                      "--max-new-tokens", "2"])
        assert "UNAUTHENTICATED" in str(e.value)
        for backend in (c.draft_address, c.target_address):  # mutual TLS: a certificate needed
            with grpc.secure_channel(backend, ClientTLS(good.ca).credentials()) as ch:
                with pytest.raises(grpc.RpcError):
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=5)
    finally:
        c.close()
