"""Flags of `pearl serve` and `pearl generate` for TLS, authentication and resource bounds
(docs/design.md section 11), with PEARL_* environment fallbacks.

serve (every role):   --tls-cert --tls-key [--tls-ca]    TLS on the port; with a CA, mutual TLS
                      --max-sessions N                    concurrent sessions (RESOURCE_EXHAUSTED)
serve draft/target:   --session-idle-s S                  close sessions silent this long
                      --kv-cache-tokens N                 KV store slots of all sessions
                      --max-batch-tokens N                tokens fed per engine step
                      --compile auto|on|off               compiled engine steps
                      --max-batch-wait-ms MS              coalescing wait before a step
                      --prefix-cache on|off               reuse cached prompt prefixes
serve coordinator:    --backend-tls-ca [--backend-tls-cert --backend-tls-key]
                                                          TLS (mTLS) towards draft and target
                      --auth-token T | PEARL_AUTH_TOKEN   bearer token on the client API
                      --max-prompt-tokens --max-new-tokens   per-request bounds
                      --draft-timeout S                   give up a silent draft (target alone)
generate:             --tls-ca [--tls-cert --tls-key] --auth-token T | PEARL_AUTH_TOKEN
"""

import os

from specdec.defaults import (
    DEFAULT_DRAFT_TIMEOUT_S,
    DEFAULT_IDLE_S,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_SESSIONS,
)
from specdec.defaults import (
    DEFAULT_KV_CACHE_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BATCH_WAIT_MS,
)


def _env(name: str, default=None):
    return os.environ.get(f"PEARL_{name}", default)


def add_serve_flags(p) -> None:
    g = p.add_argument_group("security and limits")
    g.add_argument("--tls-cert", default=_env("TLS_CERT"), help="PEM certificate: serve TLS")
    g.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=_env("TLS_CA"),
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    g.add_argument("--backend-tls-ca", default=_env("BACKEND_TLS_CA"),
                   help="coordinator: reach draft/target over TLS, trusting this CA")
    g.add_argument("--backend-tls-cert", default=_env("BACKEND_TLS_CERT"),
                   help="coordinator: client certificate for mutual TLS to draft/target")
    g.add_argument("--backend-tls-key", default=_env("BACKEND_TLS_KEY"),
                   help="coordinator: private key of --backend-tls-cert")
    g.add_argument("--auth-token", default=_env("AUTH_TOKEN"),
                   help="coordinator: require 'authorization: Bearer TOKEN' on the client API")
    g.add_argument("--max-sessions", type=int,
                   default=int(_env("MAX_SESSIONS", DEFAULT_MAX_SESSIONS)),
                   help="concurrent sessions (requests on the coordinator); 0 = no limit")
    g.add_argument("--session-idle-s", type=float,
                   default=float(_env("SESSION_IDLE_S", DEFAULT_IDLE_S)),
                   help="draft/target: close a session that hears nothing this long (0 = never)")
    g.add_argument("--kv-cache-tokens", type=int,
                   default=int(_env("KV_CACHE_TOKENS", DEFAULT_KV_CACHE_TOKENS)),
                   help="draft/target: token slots of the KV store shared by all sessions; a "
                        "session that finds it full is refused with RESOURCE_EXHAUSTED")
    g.add_argument("--max-batch-tokens", type=int,
                   default=int(_env("MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS)),
                   help="draft/target: tokens fed per engine step, all sessions together "
                        "(longer prefills are fed in chunks)")
    g.add_argument("--max-batch-wait-ms", type=float,
                   default=float(_env("MAX_BATCH_WAIT_MS", DEFAULT_MAX_BATCH_WAIT_MS)),
                   help="draft/target: before an engine step, wait at most this long (and at "
                        "most a quarter of the recent step time) for the sessions of the last "
                        "step to send their next work, so that sessions taking turns share a "
                        "step; 0 = no wait")
    g.add_argument("--compile", default=_env("COMPILE", "auto"), choices=["auto", "on", "off"],
                   help="draft/target: compiled engine steps (torch.compile; CUDA graphs on a "
                        "GPU); auto = on with --device cuda, off on the CPU")
    g.add_argument("--prefix-cache", default=_env("PREFIX_CACHE", "on"), choices=["on", "off"],
                   help="draft/target: keep the K/V of full prompt pages after a session and "
                        "reuse them for prompts that start with the same tokens (evicted least "
                        "recently used when the store needs room)")
    g.add_argument("--max-prompt-tokens", type=int,
                   default=int(_env("MAX_PROMPT_TOKENS", DEFAULT_MAX_PROMPT_TOKENS)),
                   help="coordinator: longest prompt accepted")
    g.add_argument("--max-new-tokens", type=int,
                   default=int(_env("MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS)),
                   help="coordinator: largest max_new_tokens accepted")
    g.add_argument("--draft-timeout", type=float,
                   default=float(_env("DRAFT_TIMEOUT_S", DEFAULT_DRAFT_TIMEOUT_S)),
                   help="coordinator: seconds without a draft proposal before the target "
                        "finishes alone (0 = wait forever)")


def serve_kwargs(a) -> dict:
    """Keyword arguments of the role's ``serve`` function."""
    from specdec.security import ClientTLS, ServerTLS

    kw = dict(tls=ServerTLS.from_flags(a.tls_cert, a.tls_key, a.tls_ca),
              max_sessions=a.max_sessions)
    if a.role in ("draft", "target"):
        from specdec.engine import EngineConfig

        kw.update(idle_s=a.session_idle_s, engine=EngineConfig(
            a.kv_cache_tokens, a.max_batch_tokens, a.max_batch_wait_ms, a.compile,
            a.prefix_cache == "on"))
    else:
        kw.update(backend_tls=ClientTLS.from_flags(a.backend_tls_ca, a.backend_tls_cert,
                                                   a.backend_tls_key),
                  auth_token=a.auth_token or None, max_prompt_tokens=a.max_prompt_tokens,
                  max_new_tokens=a.max_new_tokens, draft_timeout_s=a.draft_timeout)
    return kw


def add_client_flags(p) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--tls-ca", default=_env("TLS_CA"),
                   help="PEM CA that signed the coordinator's certificate: use TLS")
    g.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--auth-token", default=_env("AUTH_TOKEN"),
                   help="bearer token for the coordinator (default: PEARL_AUTH_TOKEN)")


def client_kwargs(a) -> dict:
    return dict(tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key,
                token=a.auth_token or None)
