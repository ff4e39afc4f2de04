"""Shared core of the PEARL services: models, KV cache with rollback, acceptance math, statistics.

Glossary (these words mean one thing everywhere in this project):

- committed: tokens that are final; the target's own choice or draft tokens it accepted.
- position: absolute index into a session's sequence, the prompt included.
- draft token: a token the draft model proposed for a position past the committed end.
- window: a run of draft tokens the coordinator asked for in one go (``gamma`` of them); its
  ``window_id`` tags each proposal so that a rollback can make a whole window stale.
- stale: a proposal from a window that a rollback invalidated; it is dropped on arrival.
- verified: draft tokens the target judged in one forward pass.
- accepted: the prefix of verified draft tokens the target agrees with.
- correction: the target's token at the first rejected position.
- bonus: the target's token after a fully accepted window (the forward pass gives it for free).
- emitted / new tokens: committed tokens past the prompt, returned to the client.
- pre-verify: verifying only the first token of a window while the draft drafts the rest.
- post-verify: verifying a whole window while the draft drafts the next one.
"""
