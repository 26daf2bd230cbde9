"""SFT examples and loss: rank-1 (tied-best) answers, messages files, the assistant-only mask, and the loss against a
hand-computed masked cross-entropy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from starling_jax.data.batch_spec import SFT
from starling_jax.data.nectar import Ranking, ReadReport
from starling_jax.data.sft import (
    Conversation,
    best_answers,
    load_examples,
    make_batch,
    read_conversations,
    tokenize_conversation,
)
from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
from starling_jax.errors import DataError
from starling_jax.losses.lm import masked_token_nll
from starling_jax.model.config import ModelConfig
from starling_jax.model.heads import build_model
from starling_jax.train import sft_step


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_tokenizer_dir("llama2_chat"))


def test_best_answers_keep_every_tied_best():
    r = Ranking(
        row=1,
        prompt="p",
        messages=({"role": "user", "content": "q"},),
        answers=("a", "b", "c", "d"),
        ranks=(2.0, 1.0, 3.0, 1.0),
    )
    assert best_answers(r) == ["b", "d"]


def test_nectar_and_messages_files(tmp_path):
    nectar = tmp_path / "n.jsonl"
    nectar.write_text(
        json.dumps(
            {
                "prompt": "\n\nHuman: hi\n\nAssistant:",
                "answers": [{"answer": "x", "rank": 1}, {"answer": "y", "rank": 1}, {"answer": "z", "rank": 3}],
            }
        )
        + "\n"
    )
    assert [(c.row, c.answer) for c in read_conversations(nectar)] == [(1, "x"), (1, "y")]
    msgs = tmp_path / "m.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"},
            ]
        },
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    msgs.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"messages": [\n')
    with pytest.raises(DataError, match=r"m.jsonl: row 2: 'messages' must be a list of at least two"):
        list(read_conversations(msgs))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n" + '{"messages": [\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 3: line is not JSON"):
        list(read_conversations(bad))
    report = ReadReport()
    (conv,) = list(read_conversations(msgs, on_bad_row="skip", report=report))
    assert (report.rows_read, report.rows_kept) == (3, 1)
    assert conv.answer == "ciao" and conv.messages[-1] == {"role": "user", "content": "bye"}


def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(tok):
    conv = Conversation(7, ({"role": "user", "content": "Name a colour."},), "Blue, of course.")
    ex = tokenize_conversation(conv, tok, "llama2_chat", 256)
    prompt_text = "[INST] Name a colour. [/INST]"
    prompt_ids = tok(prompt_text)["input_ids"]  # BOS + prompt, as training renders it
    assert ex.tokens.tolist()[: len(prompt_ids)] == prompt_ids and ex.answer_start == len(prompt_ids)
    assert int(ex.tokens[-1]) == tok.eos_token_id  # the end of turn is predicted: the model learns to stop
    assert tok.decode(ex.tokens[ex.answer_start :]).strip() == "Blue, of course.</s>"
    batch = make_batch([ex, None], 32, pad_id=0)
    SFT.check(batch)
    assert batch["loss_mask"][0].tolist() == [i >= ex.answer_start and i < len(ex) for i in range(32)]
    assert not batch["loss_mask"][1].any() and batch["row"].tolist() == [7, -1]


def test_masked_token_nll_equals_hand_computed_cross_entropy():
    rng = np.random.default_rng(0)
    b, length, v = 2, 6, 5
    logits = rng.normal(size=(b, length, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, length)).astype(np.int32)
    mask = np.array([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)  # prompt 3 / 1 tokens, then the answer
    nll, count = masked_token_nll(logits, tokens, mask)
    expected = np.zeros(b)
    for i in range(b):
        for t in range(1, length):
            if mask[i, t]:  # −log softmax(z[t−1])[x_t]
                z = logits[i, t - 1].astype(np.float64)
                expected[i] += np.log(np.exp(z).sum()) - z[tokens[i, t]]
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(count), mask[:, 1:].sum(1))
    # prompt positions carry no loss: changing the logits that predict prompt tokens changes nothing
    poked = logits.copy()
    poked[0, :2] += 100.0
    poked[0, 4:] = np.nan  # the last position predicts nothing; masked NaNs do not leak
    np.testing.assert_allclose(np.asarray(masked_token_nll(poked, tokens, mask)[0]), expected, rtol=1e-5)


def test_sft_step_loss_is_the_token_mean_masked_cross_entropy(tok):
    cfg = ModelConfig(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
    )
    model = build_model(cfg, "causal_lm", seed=0)
    convs = [
        Conversation(1, ({"role": "user", "content": "Hi"},), "Hello there friend"),
        Conversation(2, ({"role": "user", "content": "A much longer question, please answer"},), "No"),
    ]
    examples = [tokenize_conversation(c, tok, "llama2_chat", 64) for c in convs]
    batch = make_batch(examples, 32, pad_id=0)
    total, (count, per_row) = sft_step.sft_loss(nnx.state(model), batch, graphdef=nnx.graphdef(model))
    logits = np.asarray(model(batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
    expected, n = 0.0, 0
    for i, ex in enumerate(examples):
        for t in range(ex.answer_start, len(ex)):
            z = logits[i, t - 1]
            expected += np.log(np.exp(z - z.max()).sum()) + z.max() - z[ex.tokens[t]]
            n += 1
    assert float(count) == n == sum(len(e) - e.answer_start for e in examples)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    np.testing.assert_allclose(float(per_row.sum()), expected, rtol=1e-5)


def test_split_by_prompt_has_no_overlap(tok, tmp_path):
    from starling_jax.data.synthetic import generate, write_jsonl

    data = write_jsonl(generate(40, seed=2), tmp_path / "d.jsonl")
    common = dict(tokenizer=tok, template="llama2_chat", max_length=128, eval_fraction=0.3)
    train, _ = load_examples(data, "train", **common)
    evals, _ = load_examples(data, "eval", **common)
    assert train and evals
    key = lambda e: tuple(e.tokens[: e.answer_start].tolist())  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in evals}
