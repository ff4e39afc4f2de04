"""The analytical ceiling of the PEARL schedule, and the sequential baselines, on given timings.

Pure functions of measured figures; no model code here (`pearl bench latency` measures the
inputs).

Inputs
------
- ``t_draft``: seconds of one draft decode step.
- ``t_forward[m]``: seconds of one target forward of ``m`` new input tokens on top of a KV cache.
  Verifying ``n`` draft tokens right after a commit feeds ``n + 1`` tokens (the last committed
  token, whose cache entry does not exist yet, and the ``n`` drafts); a plain decode step is
  ``t_forward[1]``.
- ``alpha``: the probability that the draft's greedy token equals the target's at a position,
  taken as independent across positions (the usual i.i.d. model of speculative decoding).

Judging and committing
----------------------
A target forward that feeds ``m`` tokens gives logits for ``m`` positions. Of the ``n`` draft
tokens it judges (in order), let J be the number accepted before the first rejection:
P(J = j) = alpha^j (1 - alpha) for j < n and P(J = n) = alpha^n. A rejection at j commits the j
accepted tokens and the target's correction (j + 1); if the last judged token is one the target
itself chose (the bonus), the count is n either way. Expected tokens committed:
    E(n) = sum_{j<n} alpha^j = (1 - alpha^n) / (1 - alpha).

ar:  1 / t_forward[1].
sd (window gamma, strictly in turn): each round drafts gamma tokens, then one forward feeds
     gamma + 1 tokens, judges gamma drafts and adds the bonus or correction:
     E(gamma + 1) / (gamma * t_draft + t_forward[gamma + 1]).

PEARL (pre/post-verify, window gamma >= 2), perfect overlap (nothing waits that need not, and
messages cost nothing). Three kinds of round; the last position of each round's judgement is the
bonus (the target's own next token, or its kept distribution) matched against the draft's token
there, which costs no extra forward:
- PRE (at start and after any rejection): the draft drafts the window's first token (t_draft),
  the target verifies it at once, feeding 2 tokens, while the draft drafts on. Judged n = 2 (the
  first token and, through the bonus, the second). Time: t_draft + t_forward[2], but the second
  token must exist for the bonus (max with t_draft), and on success the whole window must be
  drafted before the next round (max with (gamma - 1) * t_draft). Success (J = 2, prob alpha^2)
  -> POST1; otherwise PRE.
- POST1 (the first post-verify round after a successful PRE): the target verifies the rest of the
  window (gamma - 2 drafts; it feeds gamma - 1 tokens) while the draft drafts the next window;
  the bonus judges the next window's first token: n = gamma - 1. Time: t_forward[gamma - 1], with
  max t_draft when the bonus is reached and max gamma * t_draft on success (the next window must
  be complete). Success -> POST; otherwise PRE.
- POST (steady state): the target verifies a window whose first token the previous bonus judged:
  it feeds gamma tokens, judges gamma - 1 drafts plus the next window's first through the bonus:
  n = gamma. Time as in POST1 with t_forward[gamma]. Success (alpha^gamma) -> POST; otherwise PRE.
PRE is a renewal point, so the rate is E[tokens per cycle] / E[time per cycle] with a cycle
PRE -> (POST1 -> POST^k)?, the number of POST rounds geometric with mean 1 / (1 - alpha^gamma):
    tokens = E(2) + a^2 (E(g-1) + a^(g-1) E(g) / (1 - a^g))
    time   = T_pre + a^2 (T_post1 + a^(g-1) T_post / (1 - a^g))
alpha = 1: the run stays in POST: gamma / max(t_forward[gamma], gamma * t_draft).
alpha = 0: every round is a rejected PRE: 1 / (t_draft + t_forward[2]).
gamma = 1 (the window holds one token; the bonus follows it and the draft restarts from it):
    (1 + alpha) / (t_draft + t_forward[2]), which is sd with gamma = 1.
``ceiling(..., gamma=None)`` is the best over the window lengths that ``t_forward`` covers.

The schedule (docs/design.md section 4) does not wait for a whole window in post-verify: it sends
the draft tokens that exist when the target is free. With one request and the balanced gamma the
whole window exists by then (the draft drafted it during the previous forward), so the rounds
above are what it runs; under load it sends fewer rather than wait, which this model leaves out.

What the model leaves out (so the ceiling is an upper bound for this schedule): protocol and
Python overhead, the draft's catch-up after a rollback, the part of a stale draft forward that
runs before its abort lands, and the end of the request (a trimmed last window).

The prefill is not left out of a request's rate: every schedule prefills the prompt on the target
before its first token, so a request of n new tokens takes at least t_prefill + n / rate
(``with_prefill``); the bench compares measured rates with ceilings that include it.
"""

from __future__ import annotations


def expected_committed(alpha: float, n: int) -> float:
    """E(n) = sum_{j<n} alpha^j: tokens committed by a round that judges n positions."""
    return float(n) if alpha >= 1 else (1 - alpha ** n) / (1 - alpha)


def ar_rate(t_forward: dict[int, float]) -> float:
    return 1.0 / t_forward[1]


def sd_rate(t_draft: float, t_forward: dict[int, float], alpha: float, gamma: int) -> float:
    """Tokens/s of sequential speculative decoding with a fixed window."""
    return expected_committed(alpha, gamma + 1) / (gamma * t_draft + t_forward[gamma + 1])


def _round(alpha: float, fwd: float, n: int, t_draft: float,
           gamma: int) -> tuple[float, float, float]:
    """(expected tokens, expected time, success probability) of a post-verify round that
    judges n positions (the last through the bonus) with a forward taking ``fwd``."""
    p_fail_fwd = 1 - alpha ** (n - 1)  # a rejection inside the forward: the draft is not needed
    p_bonus_miss = alpha ** (n - 1) * (1 - alpha)  # needs the next window's first token
    p_ok = alpha ** n  # needs the whole next window
    time = (p_fail_fwd * fwd + p_bonus_miss * max(fwd, t_draft)
            + p_ok * max(fwd, gamma * t_draft))
    return expected_committed(alpha, n), time, p_ok


def ceiling(t_draft: float, t_forward: dict[int, float], alpha: float,
            gamma: int | None = None) -> float:
    """Best tokens/s of the PEARL pre/post-verify schedule with perfect overlap (module doc)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gamma is None:
        return ceiling(t_draft, t_forward, alpha, best_gamma(t_draft, t_forward, alpha))
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    tf = t_forward
    if gamma == 1:
        return (1 + alpha) / (t_draft + tf[2])
    if alpha >= 1:
        return gamma / max(tf[gamma], gamma * t_draft)
    a = alpha
    e_pre = expected_committed(a, 2)
    t_pre = t_draft + ((1 - a) * tf[2] + a * (1 - a) * max(tf[2], t_draft)
                       + a * a * max(tf[2], (gamma - 1) * t_draft))
    e1, t1, p1 = _round(a, tf[gamma - 1], gamma - 1, t_draft, gamma)
    e2, t2, p2 = _round(a, tf[gamma], gamma, t_draft, gamma)
    tokens = e_pre + a * a * (e1 + p1 * e2 / (1 - p2))
    time = t_pre + a * a * (t1 + p1 * t2 / (1 - p2))
    return tokens / time


def best_gamma(t_draft: float, t_forward: dict[int, float], alpha: float) -> int:
    """The window length with the highest ceiling among those ``t_forward`` covers."""
    windows = [g for g in range(1, 65)
               if 2 in t_forward and (g == 1 or (g in t_forward and g - 1 in t_forward))]
    return max(windows, key=lambda g: ceiling(t_draft, t_forward, alpha, g))


def with_prefill(rate: float, new_tokens: int, prefill_s: float) -> float:
    """Tokens/s of requests that prefill for ``prefill_s`` and then decode ``new_tokens`` at
    ``rate`` (summed over requests: total new tokens, total prefill seconds)."""
    if new_tokens <= 0:
        return 0.0
    return new_tokens / (prefill_s + new_tokens / rate)
