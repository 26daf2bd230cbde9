"""Policy tuning (PPO / APA): pure, jittable RL math and the hydra reference.

  kl.py          per-token KL estimators (k1, k2, k3) and the fixed / adaptive KL-coefficient controllers
  rewards.py     the sequence score (RM at the last real token), its normalization / clipping, running moments,
                 the missing-EOS penalty and the per-token reward (KL penalty + score at the last token)
  advantages.py  GAE (γ, λ) with `lax.scan` over response tokens, masked whitening
  losses.py      PPO clipped policy loss, clipped value loss, entropy bonus, APA (paper and released forms),
                 the critic warm-up gate
  hydra.py       trlx's "hydra" reference: a frozen copy of the top N layers on the actor's shared frozen bottom

Response-token arrays share one layout: [B, T], B rollouts, T response tokens (right-padded); `mask` [B, T] is 1
on the generated tokens (the final EOS included) and 0 on padding. Token t's log-prob, value and reward belong to
the action "emit response token t" taken in state (prompt, response[:t]).
"""
