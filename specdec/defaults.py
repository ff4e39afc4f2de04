"""Every default of the system, named once: the services, the coordinator and the `pearl` command
all take their defaults from here.

Plain constants and no imports, so that reading a default (as `pearl --help` does for every flag)
never loads torch, transformers or grpc.
"""

# Where the services listen (`pearl serve ROLE` without --port).
DEFAULT_PORTS = {"draft": 50051, "target": 50052, "coordinator": 50050}
DEFAULT_COORDINATOR = f"localhost:{DEFAULT_PORTS['coordinator']}"  # what `pearl generate` calls

# The default pair (registry names of specdec/model_store.py; docs/design.md section 8).
DEFAULT_MODELS = {"draft": "qwen2.5-coder-0.5b-instruct", "target": "qwen2.5-coder-1.5b-instruct"}
DEFAULT_DTYPE = "bfloat16"
DTYPES = ("bfloat16", "float32", "float16")

# Windows (docs/design.md section 4). DEFAULT_GAMMA: sd's window when a request names none, and
# pearl's window until both forward times have been measured; DEFAULT_GAMMA_MAX: the largest
# adaptive window; DEFAULT_PAIR_GAMMA: sd's window in `pearl demo` and `pearl bench`, the default
# pair's balanced window on one core each (t_verify / t_draft ~ 3).
DEFAULT_GAMMA = 4
DEFAULT_GAMMA_MAX = 8
DEFAULT_PAIR_GAMMA = 3

# Hidden Transfer: candidate nodes under the root of a tree (docs/hidden-transfer.md: the sweep).
DEFAULT_TREE_NODES = 4

# Tokens generated per request by `pearl generate`, `pearl demo` and `pearl bench`.
DEFAULT_NEW_TOKENS = 64

# Reliability and resource bounds (docs/design.md section 11).
DEFAULT_DRAFT_TIMEOUT_S = 10.0  # a draft silent this long is given up: the target finishes alone
DEFAULT_MAX_SESSIONS = 64  # concurrent sessions per service (RESOURCE_EXHAUSTED past it)
DEFAULT_IDLE_S = 300.0  # a session that hears nothing this long is closed
DEFAULT_MAX_PROMPT_TOKENS = 16384  # longest prompt a coordinator accepts
DEFAULT_MAX_NEW_TOKENS = 4096  # largest max_new_tokens a coordinator accepts
DEFAULT_GRACE_S = 10.0  # seconds to drain in-flight calls on SIGTERM
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # a client with no connection this long fails (Unreachable)

# The engine of each draft/target process (docs/design.md: the engine).
DEFAULT_KV_CACHE_TOKENS = 65_536  # KV store slots shared by all sessions of one model
DEFAULT_MAX_BATCH_TOKENS = 512  # tokens fed per engine step; longer prefills go in chunks
# Before a step, wait at most this long (and at most a quarter of the recent step time) for the
# sessions of the last step that usually come straight back, so that sessions taking turns share
# a step instead of alternating; 0 = start each step with whatever is pending.
DEFAULT_MAX_BATCH_WAIT_MS = 10.0
