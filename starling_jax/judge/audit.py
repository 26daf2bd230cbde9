"""`label --audit`: positional bias measured from the judged orders, not assumed.

- `first_position_rate[K][p]`: how often the judge ranked first the answer it was shown at position p (letter
  A + p), over every judged order of the rows with K answers; an unbiased judge gives 1/K at every position.
- `label_first_is_shown_first`: how often the LABEL's best answer (after aggregation) is the answer shown first,
  averaged over the orders of each row (1/|best| per best answer shown first, so ties count fairly); a fixed order
  gives the judge's first-position bias, N ≥ K balanced orders give exactly 1/K.
- `agreement`: mean over rows of the mean Kendall τ between the rankings of the row's orders (1 = every order gave
  the same ranking), and the number of rows it is measured on (those with ≥ 2 orders).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def audit(judged: dict, labelled) -> dict:
    """judged: {row: [OrderResult]}, labelled: [(row, ranks, record)] → the audit dict."""
    firsts: dict[int, np.ndarray] = {}
    counts: dict[int, int] = defaultdict(int)
    for results in judged.values():
        for r in results:
            if r.presented is None:
                continue
            k = len(r.order)
            firsts.setdefault(k, np.zeros(k))[r.presented[0]] += 1
            counts[k] += 1
    shown_first, uniform, taus = [], [], []
    for row, ranks, record in labelled:
        best = [i for i, rank in enumerate(ranks) if rank == min(ranks)]
        orders = record.get("orders") or []
        if orders:
            shown_first.append(np.mean([(order[0] in best) / len(best) for order in orders]))
            uniform.append(1.0 / len(ranks))
        if record.get("agreement") is not None:
            taus.append(record["agreement"])
    by_k = {
        str(k): {
            "orders_judged": counts[k],
            "uniform": 1.0 / k,
            "first_position_rate": [round(float(x / counts[k]), 4) for x in firsts[k]],
            "max_deviation": round(float(np.max(np.abs(firsts[k] / counts[k] - 1.0 / k))), 4),
        }
        for k in sorted(firsts)
    }
    return {
        "by_num_answers": by_k,
        "label_first_is_shown_first": round(float(np.mean(shown_first)), 4) if shown_first else None,
        "label_first_uniform": round(float(np.mean(uniform)), 4) if uniform else None,
        "agreement": round(float(np.mean(taus)), 4) if taus else None,
        "agreement_rows": len(taus),
    }
