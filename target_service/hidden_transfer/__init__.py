"""Hidden Transfer (Wu et al. 2024, arXiv 2404.12022): the target drafts for itself.

    layers.py   the trained transfer maps, their weights file (load/save, where to find it)
    tree.py     which candidates a step feeds (rank paths) and how they attend (tree masks)
    session.py  one decoding session: a tree per step, one feed of the target's batched engine

Training (self-distillation, the model frozen) is no part of serving: pearl/transfer_train.py,
behind `pearl transfer train`. docs/hidden-transfer.md explains the method and the numbers.

Words used across the wing:

  layer L    the decoder layer whose *input* hidden states the transfer maps read
             (HF's ``hidden_states[L]``); layers L.. run on pseudo tokens too, layers < L do not.
  k          future positions drafted per forward pass.
  pseudo     ``transfer(h)[i-1]``, i = 1..k: a made-up layer-L hidden state for the token i places
             after the token whose state ``h`` is. It goes through layers L.. like a real token,
             attending to the real sequence and to the earlier pseudo tokens of the same node, and
             the model's own LM head turns it into a draft distribution for the position after it.
  node       a real token fed in a forward pass: a prompt token at prefill, or a tree node.
  tree       the root (the token the model chose last step, committed but not yet fed) and
             candidate nodes below it; a node at depth d holds a candidate for root position + d,
             taken from the root's draft distributions by the rank path that names it.
  accepted   the nodes on the longest root path whose every token is the model's own choice.

The model itself is never changed.
"""
