"""The Nectar procedure with an LLM judge, over a thread pool.

For each row and each of its N orders (`prompt.orders_for_row`): the messages are built from the template, sent,
and the reply's ranking (presented letters best-first) is mapped back through the order to answer indices. A reply
that is not a permutation of the letters is answered with a re-ask (the reply and a short request for the ranking
alone are appended to the conversation) up to `max_attempts` requests in all; then the row is rejected with the
last reason. Every answered request (usable or not) is appended to the cache before anything else happens, and
a restarted run replays the cache: it sends only requests whose answer is not on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from starling_jax.judge import prompt as prompt_lib
from starling_jax.judge.aggregate import agreement, borda_scores, ranks_from_scores
from starling_jax.judge.cache import Cache
from starling_jax.judge.openai_judge import TransportError
from starling_jax.judge.parse import ReplyError, parse_ranking
from starling_jax.judge.rows import Row

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OrderResult:
    order: tuple[int, ...]  # answer indices in the order shown
    ranking: list[int] | None = None  # answer indices best-first
    presented: list[int] | None = None  # presented positions best-first (the reply as parsed)
    error: str | None = None  # why there is no ranking
    attempts: int = 0
    cached: bool = False  # answered from the cache alone


def request_key(judge_spec: str, template: prompt_lib.Template, row: Row, order_index: int, order) -> str:
    text = json.dumps([judge_spec, template.sha256, row.content_key, order_index, list(order)])
    return hashlib.sha256(text.encode()).hexdigest()


def judge_order(
    judge, judge_spec: str, template, cache: Cache, row: Row, order_index: int, order, seed: int, max_attempts: int
) -> OrderResult:
    key = request_key(judge_spec, template, row, order_index, order)
    pairs = prompt_lib.pairs_for_order(seed, row.content_key, order_index, row.k)
    messages = prompt_lib.build_messages(template, row.prompt, row.answers, order, pairs)
    result = OrderResult(order=tuple(order))
    done = cache.attempts(key)
    for record in done:  # replay: the answers on disk, in attempt order
        result.attempts += 1
        if record.get("ranking") is not None:
            result.presented = list(record["ranking"])
            result.ranking = [order[p] for p in result.presented]
            result.cached = True
            return result
        result.error = record.get("error")
        messages = messages + [
            {"role": "assistant", "content": record.get("reply") or ""},
            prompt_lib.reask_message(result.error or "", row.k),
        ]
    result.cached = result.attempts >= max_attempts
    while result.attempts < max_attempts:
        try:
            reply = judge.complete(messages)
        except TransportError as e:
            result.error = f"request failed: {e}"
            return result
        record = {
            "key": key,
            "attempt": result.attempts,
            "row": row.row,
            "order_index": order_index,
            "order": list(order),
            "judge": judge_spec,
            "template": template.sha256,
            "reply": reply,
        }
        result.attempts += 1
        try:
            result.presented = parse_ranking(reply, row.k)
        except ReplyError as e:
            result.error = f"unusable reply: {e}"
            record["error"] = str(e)
            cache.append(record)
            messages = messages + [
                {"role": "assistant", "content": reply or ""},
                prompt_lib.reask_message(str(e), row.k),
            ]
            continue
        record["ranking"] = result.presented
        cache.append(record)
        result.ranking = [order[p] for p in result.presented]
        result.error = None
        return result
    result.error = f"{result.error} ({result.attempts} of {max_attempts} attempts)"
    return result


def label_rows(
    rows: list[Row],
    judge,
    judge_spec: str,
    template,
    cache: Cache,
    *,
    orders: int,
    seed: int,
    fixed_order: bool,
    concurrency: int,
    max_attempts: int,
    progress=None,
):
    """→ (labelled: [(row, ranks, record)], rejected: [{row, reason, ...}], judged: {row: [OrderResult]})."""
    jobs = []
    for row in rows:
        row_orders = (
            [tuple(range(row.k))] if fixed_order else prompt_lib.orders_for_row(seed, row.content_key, row.k, orders)
        )
        for o, order in enumerate(row_orders):
            jobs.append((row, o, order))
    results: dict[int, list[OrderResult]] = {row.row: [] for row in rows}
    with ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
        futures = [
            (row, pool.submit(judge_order, judge, judge_spec, template, cache, row, o, order, seed, max_attempts))
            for row, o, order in jobs
        ]
        try:
            for row, future in futures:
                results[row.row].append(future.result())  # a JudgeError (fatal) propagates from here
                if progress is not None:
                    progress.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # send nothing more; the cache holds what was answered
            raise
    labelled, rejected = [], []
    for row in rows:
        judged = results[row.row]
        failed = [r for r in judged if r.ranking is None]
        if failed:
            # final: every failed order used up its attempts (a rerun asks again only after a transport failure)
            rejected.append(
                {
                    "row": row.row,
                    "reason": failed[0].error,
                    "orders_failed": len(failed),
                    "orders": len(judged),
                    "final": all(r.attempts >= max_attempts for r in failed),
                }
            )
            continue
        rankings = [r.ranking for r in judged]
        ranks = ranks_from_scores(borda_scores(rankings, row.k))
        record = {
            "judge": judge_spec,
            "judge_template": template.name,
            "orders": [list(r.order) for r in judged],
            "rankings": rankings,
            "aggregation": "borda",
            "agreement": agreement(rankings),
        }
        labelled.append((row, ranks, record))
    return labelled, rejected, results
