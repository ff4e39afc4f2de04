"""What a session refuses: messages that do not fit its state, and token ids a model cannot take
(answered with INVALID_ARGUMENT, naming the field)."""


class ProtocolError(ValueError):
    """A message that does not fit a session's state (answered with INVALID_ARGUMENT)."""


def check_prompt(prompt_ids: list[int], vocab: int, max_positions: int) -> None:
    """Raise ProtocolError naming start.prompt_ids when a session cannot start on it."""
    if not prompt_ids:
        raise ProtocolError("start.prompt_ids is empty")
    if len(prompt_ids) >= max_positions:
        raise ProtocolError(
            f"start.prompt_ids has {len(prompt_ids)} tokens; the model takes {max_positions}")
    check_ids(prompt_ids, vocab, "start.prompt_ids")


def check_ids(ids: list[int], vocab: int, field: str) -> None:
    """Raise ProtocolError naming ``field`` when a token id is outside the vocabulary."""
    if any(not 0 <= t < vocab for t in ids):
        raise ProtocolError(f"{field} holds ids outside the vocabulary of {vocab}")
