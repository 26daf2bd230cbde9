"""Judges that rank the K answers of a prompt (`python -m starling_jax.label`; `evaluate` reuses them).

- `gather`: answers from several sources → unranked Nectar-schema rows (`python -m starling_jax.gather_answers`).
- `labelling`: `label` itself: read rows, rank them with a judge, write the ranked rows, rejects and audit.
- `rows`: unranked Nectar-schema rows in (`prompt`, `answers: [{answer, model}]`), ranked Nectar rows out.
- `prompt`: the judge template (package data `resources/judge_nectar.txt`, or `--judge-template`), the per-row
  seeded orders (shuffles) and the prompt built from them (letters, every pair in a random order).
- `parse`: the judge's reply → a permutation of the letters, or the reason it is not one.
- `aggregate`: Borda aggregation of several orders, ranks with ties, Kendall τ.
- `cache`: the append-only, fsync'd JSON-lines cache of answered requests (restart re-sends nothing answered).
- `openai_judge`: any OpenAI-compatible chat-completions server through the `openai` client, with retries.
- `llm`: the Nectar procedure over a thread pool (orders, re-asks, rejects, usage counts).
- `rm_judge`: a reward model ranks by reward (the same scoring as `python -m starling_jax.score`).
- `audit`: positional bias and agreement between orders, measured from the judged orders.
"""
