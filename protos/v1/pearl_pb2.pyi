from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_AR: _ClassVar[Mode]
    MODE_SD: _ClassVar[Mode]
    MODE_PEARL: _ClassVar[Mode]
    MODE_HIDDEN_TRANSFER: _ClassVar[Mode]
MODE_UNSPECIFIED: Mode
MODE_AR: Mode
MODE_SD: Mode
MODE_PEARL: Mode
MODE_HIDDEN_TRANSFER: Mode

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenDistribution(_message.Message):
    __slots__ = ("token_ids", "probs_f16")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_F16_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs_f16: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs_f16: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model", "vocab_size", "eos_token_ids", "max_positions", "tokenizer_json", "chat_template", "device", "dtype", "live_sessions", "hidden_transfer", "engine", "kv_cache_tokens", "kv_free_tokens", "kv_bytes_per_token", "max_batch_tokens", "compiled", "prefix_cache", "kv_cached_tokens", "prefix_hit_tokens", "prefix_lookup_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_positions: int
    tokenizer_json: str
    chat_template: str
    device: str
    dtype: str
    live_sessions: int
    hidden_transfer: str
    engine: str
    kv_cache_tokens: int
    kv_free_tokens: int
    kv_bytes_per_token: int
    max_batch_tokens: int
    compiled: bool
    prefix_cache: bool
    kv_cached_tokens: int
    prefix_hit_tokens: int
    prefix_lookup_tokens: int
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_positions: _Optional[int] = ..., tokenizer_json: _Optional[str] = ..., chat_template: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., live_sessions: _Optional[int] = ..., hidden_transfer: _Optional[str] = ..., engine: _Optional[str] = ..., kv_cache_tokens: _Optional[int] = ..., kv_free_tokens: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., compiled: _Optional[bool] = ..., prefix_cache: _Optional[bool] = ..., kv_cached_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefix_lookup_tokens: _Optional[int] = ...) -> None: ...

class DraftStart(_message.Message):
    __slots__ = ("session_id", "prompt_ids", "sampling", "window_id", "draft_until", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    window_id: int
    draft_until: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., window_id: _Optional[int] = ..., draft_until: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DraftExtend(_message.Message):
    __slots__ = ("window_id", "draft_until")
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    window_id: int
    draft_until: int
    def __init__(self, window_id: _Optional[int] = ..., draft_until: _Optional[int] = ...) -> None: ...

class DraftRollback(_message.Message):
    __slots__ = ("keep", "append_ids", "window_id", "draft_until")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    APPEND_IDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    keep: int
    append_ids: _containers.RepeatedScalarFieldContainer[int]
    window_id: int
    draft_until: int
    def __init__(self, keep: _Optional[int] = ..., append_ids: _Optional[_Iterable[int]] = ..., window_id: _Optional[int] = ..., draft_until: _Optional[int] = ...) -> None: ...

class DraftStop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("start", "extend", "rollback", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: DraftStart
    extend: DraftExtend
    rollback: DraftRollback
    stop: DraftStop
    def __init__(self, start: _Optional[_Union[DraftStart, _Mapping]] = ..., extend: _Optional[_Union[DraftExtend, _Mapping]] = ..., rollback: _Optional[_Union[DraftRollback, _Mapping]] = ..., stop: _Optional[_Union[DraftStop, _Mapping]] = ...) -> None: ...

class DraftProposal(_message.Message):
    __slots__ = ("window_id", "position", "token_id", "q", "forward_ns", "started_unix_ns", "input_tokens", "batch_rows", "batch_tokens", "queue_ns", "cached_tokens")
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    window_id: int
    position: int
    token_id: int
    q: TokenDistribution
    forward_ns: int
    started_unix_ns: int
    input_tokens: int
    batch_rows: int
    batch_tokens: int
    queue_ns: int
    cached_tokens: int
    def __init__(self, window_id: _Optional[int] = ..., position: _Optional[int] = ..., token_id: _Optional[int] = ..., q: _Optional[_Union[TokenDistribution, _Mapping]] = ..., forward_ns: _Optional[int] = ..., started_unix_ns: _Optional[int] = ..., input_tokens: _Optional[int] = ..., batch_rows: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., queue_ns: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("proposal",)
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    proposal: DraftProposal
    def __init__(self, proposal: _Optional[_Union[DraftProposal, _Mapping]] = ...) -> None: ...

class VerifyStart(_message.Message):
    __slots__ = ("session_id", "prompt_ids", "sampling", "first_token", "trace_context", "hidden_transfer", "logprobs", "top_logprobs")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    first_token: bool
    trace_context: _containers.ScalarMap[str, str]
    hidden_transfer: bool
    logprobs: bool
    top_logprobs: int
    def __init__(self, session_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., first_token: _Optional[bool] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., hidden_transfer: _Optional[bool] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class VerifyWindow(_message.Message):
    __slots__ = ("position", "draft_ids", "q", "window_id", "phase", "bonus", "held")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BONUS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    position: int
    draft_ids: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[TokenDistribution]
    window_id: int
    phase: str
    bonus: bool
    held: bool
    def __init__(self, position: _Optional[int] = ..., draft_ids: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[TokenDistribution, _Mapping]]] = ..., window_id: _Optional[int] = ..., phase: _Optional[str] = ..., bonus: _Optional[bool] = ..., held: _Optional[bool] = ...) -> None: ...

class VerifyStop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("start", "window", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: VerifyStart
    window: VerifyWindow
    stop: VerifyStop
    def __init__(self, start: _Optional[_Union[VerifyStart, _Mapping]] = ..., window: _Optional[_Union[VerifyWindow, _Mapping]] = ..., stop: _Optional[_Union[VerifyStop, _Mapping]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("position", "verified", "accepted", "token_id", "committed", "forward_ns", "started_unix_ns", "window_id", "phase", "input_tokens", "has_token", "accepted_ids", "batch_rows", "batch_tokens", "queue_ns", "logprobs", "cached_tokens")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    position: int
    verified: int
    accepted: int
    token_id: int
    committed: int
    forward_ns: int
    started_unix_ns: int
    window_id: int
    phase: str
    input_tokens: int
    has_token: bool
    accepted_ids: _containers.RepeatedScalarFieldContainer[int]
    batch_rows: int
    batch_tokens: int
    queue_ns: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    cached_tokens: int
    def __init__(self, position: _Optional[int] = ..., verified: _Optional[int] = ..., accepted: _Optional[int] = ..., token_id: _Optional[int] = ..., committed: _Optional[int] = ..., forward_ns: _Optional[int] = ..., started_unix_ns: _Optional[int] = ..., window_id: _Optional[int] = ..., phase: _Optional[str] = ..., input_tokens: _Optional[int] = ..., has_token: _Optional[bool] = ..., accepted_ids: _Optional[_Iterable[int]] = ..., batch_rows: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., queue_ns: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: VerifyResult
    def __init__(self, result: _Optional[_Union[VerifyResult, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_ids", "mode", "max_new_tokens", "sampling", "gamma", "gamma_max", "stop", "ignore_eos", "chat", "messages", "logprobs", "top_logprobs")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    GAMMA_MAX_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    mode: Mode
    max_new_tokens: int
    sampling: SamplingParams
    gamma: int
    gamma_max: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    chat: bool
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    logprobs: bool
    top_logprobs: int
    def __init__(self, prompt: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[Mode, str]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., gamma: _Optional[int] = ..., gamma_max: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., chat: _Optional[bool] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ForwardTimes(_message.Message):
    __slots__ = ("count", "seconds")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    seconds: float
    def __init__(self, count: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("new_tokens", "wall_s", "tokens_per_s", "draft_tokens", "accepted_tokens", "acceptance_rate", "target_forwards", "draft_forwards", "tokens_per_target_forward", "mean_accepted_tokens", "per_position_acceptance", "gamma_history", "draft_length_histogram", "both_busy_s", "target_idle_s", "draft_idle_s", "overlap_ratio", "stale_proposals", "time_to_first_token_s", "finish_reason", "mode", "prompt_tokens", "fell_back", "fallback_reason", "prefill_s", "target_forward_times", "draft_forward_times", "queue_wait_s", "mean_target_batch", "cached_prompt_tokens", "draft_cached_prompt_tokens")
    class DraftLengthHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class TargetForwardTimesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: ForwardTimes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[ForwardTimes, _Mapping]] = ...) -> None: ...
    class DraftForwardTimesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: ForwardTimes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[ForwardTimes, _Mapping]] = ...) -> None: ...
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TARGET_FORWARD_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_HISTORY_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LENGTH_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    BOTH_BUSY_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    DRAFT_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_RATIO_FIELD_NUMBER: _ClassVar[int]
    STALE_PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARD_TIMES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FORWARD_TIMES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_TARGET_BATCH_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    target_forwards: int
    draft_forwards: int
    tokens_per_target_forward: float
    mean_accepted_tokens: float
    per_position_acceptance: _containers.RepeatedScalarFieldContainer[float]
    gamma_history: _containers.RepeatedScalarFieldContainer[int]
    draft_length_histogram: _containers.ScalarMap[int, int]
    both_busy_s: float
    target_idle_s: float
    draft_idle_s: float
    overlap_ratio: float
    stale_proposals: int
    time_to_first_token_s: float
    finish_reason: str
    mode: str
    prompt_tokens: int
    fell_back: bool
    fallback_reason: str
    prefill_s: float
    target_forward_times: _containers.MessageMap[int, ForwardTimes]
    draft_forward_times: _containers.MessageMap[int, ForwardTimes]
    queue_wait_s: float
    mean_target_batch: float
    cached_prompt_tokens: int
    draft_cached_prompt_tokens: int
    def __init__(self, new_tokens: _Optional[int] = ..., wall_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., draft_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., target_forwards: _Optional[int] = ..., draft_forwards: _Optional[int] = ..., tokens_per_target_forward: _Optional[float] = ..., mean_accepted_tokens: _Optional[float] = ..., per_position_acceptance: _Optional[_Iterable[float]] = ..., gamma_history: _Optional[_Iterable[int]] = ..., draft_length_histogram: _Optional[_Mapping[int, int]] = ..., both_busy_s: _Optional[float] = ..., target_idle_s: _Optional[float] = ..., draft_idle_s: _Optional[float] = ..., overlap_ratio: _Optional[float] = ..., stale_proposals: _Optional[int] = ..., time_to_first_token_s: _Optional[float] = ..., finish_reason: _Optional[str] = ..., mode: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., fell_back: _Optional[bool] = ..., fallback_reason: _Optional[str] = ..., prefill_s: _Optional[float] = ..., target_forward_times: _Optional[_Mapping[int, ForwardTimes]] = ..., draft_forward_times: _Optional[_Mapping[int, ForwardTimes]] = ..., queue_wait_s: _Optional[float] = ..., mean_target_batch: _Optional[float] = ..., cached_prompt_tokens: _Optional[int] = ..., draft_cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "stats", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: GenerateStats
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("live_sessions", "max_sessions", "draining", "kv_free_tokens", "kv_cached_tokens")
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    live_sessions: int
    max_sessions: int
    draining: bool
    kv_free_tokens: int
    kv_cached_tokens: int
    def __init__(self, live_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., draining: _Optional[bool] = ..., kv_free_tokens: _Optional[int] = ..., kv_cached_tokens: _Optional[int] = ...) -> None: ...
