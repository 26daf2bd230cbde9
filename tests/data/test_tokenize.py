"""Hand-written rows → expected tokens and reward index."""
import numpy as np
import pytest

from starling_jax.data.chat import parse_hh, render
from starling_jax.data.nectar import validate_row
from starling_jax.data.tokenize import RowDoesNotFit, tokenize_answers, tokenize_ranking

MULTI = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"


def row(prompt, answers, ranks):
    return validate_row({"prompt": prompt, "answers": [{"answer": a, "model": f"m{i}", "rank": r}
                                                       for i, (a, r) in enumerate(zip(answers, ranks))]}, 1)


def ids(tok, text):
    return tok(text).input_ids  # BOS added by the tokenizer, as Starling-RM did


def test_multi_turn_llama2_exact(tok):
    r = row(MULTI, ["Fine, thanks.", "Bad."], [1, 2])
    t = tokenize_ranking(r, tok, "llama2_chat", 512)
    for j, a in enumerate(r.answers):
        want = ids(tok, f"[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST] {a}</s>")
        assert t.tokens[j].tolist() == want
        assert t.reward_index[j] == len(want) - 1 and want[t.reward_index[j]] == tok.eos_token_id
        assert want[0] == tok.bos_token_id
        prompt = ids(tok, "[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST]")
        assert t.answer_start[j] == len(prompt) and want[:len(prompt)] == prompt
        assert tok.decode(want[t.answer_start[j]:t.answer_start[j] + t.answer_lengths[j]]).strip() == a
    assert not t.truncated


def test_tied_ranks_and_three_answers(tok):
    r = row("\n\nHuman: Pick one.\n\nAssistant:", ["A", "B", "C"], [2, 1, 2])
    assert r.best_first() == [1, 0, 2] and r.tie_groups() == [[1], [0, 2]]
    t = tokenize_ranking(r, tok, "llama2_chat", 64)
    assert t.ranks.tolist() == [2.0, 1.0, 2.0] and t.num_answers == 3
    for j, a in enumerate("ABC"):
        assert t.tokens[j].tolist() == ids(tok, f"[INST] Pick one. [/INST] {a}</s>")


def test_unicode(tok):
    a = "Ça va? 你好 🙂 — naïve"
    r = row("\n\nHuman: Grüße, 世界!\n\nAssistant:", [a, "x"], [1, 2])
    t = tokenize_ranking(r, tok, "llama2_chat", 128)
    want = ids(tok, f"[INST] Grüße, 世界! [/INST] {a}</s>")
    assert t.tokens[0].tolist() == want and t.reward_index[0] == len(want) - 1
    assert tok.decode(t.tokens[0][t.answer_start[0]:t.answer_start[0] + t.answer_lengths[0]]).strip() == a


def test_empty_answer(tok):
    r = row("\n\nHuman: Say nothing.\n\nAssistant:", ["", "something"], [1, 2])
    t = tokenize_ranking(r, tok, "llama2_chat", 64)
    want = ids(tok, "[INST] Say nothing. [/INST] </s>")
    assert t.tokens[0].tolist() == want
    assert t.answer_lengths[0] == 0 and t.reward_index[0] == len(want) - 1 and want[-1] == tok.eos_token_id


def test_answer_longer_than_max_length(tok):
    long = " ".join(["word"] * 200)
    r = row(MULTI, [long, "short"], [1, 2])
    t = tokenize_ranking(r, tok, "llama2_chat", 64)
    seq = t.tokens[0].tolist()
    assert len(seq) == 64 and t.reward_index[0] == 63 and seq[-1] == tok.eos_token_id and seq[0] == 1
    # oldest turn dropped first, then the prompt cut from the left, then the answer cut from the right
    assert t.turns_dropped[0] == 1 and t.answer_cut[0] > 0
    last_turn = ids(tok, "[INST] How are you? [/INST]")
    prompt = seq[:t.answer_start[0]]
    assert prompt == last_turn[:1] + last_turn[len(last_turn) - (len(prompt) - 1):]
    assert set(seq[t.answer_start[0]:63]) == set(ids(tok, "word word")[1:])
    assert t.truncated
    # the short answer is untouched and keeps the whole conversation
    assert t.tokens[1].tolist() == ids(tok, "[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST] short</s>")


def test_cannot_fit(tok):
    r = row(MULTI, ["a", "b"], [1, 2])
    with pytest.raises(RowDoesNotFit, match="cannot fit"):
        tokenize_ranking(r, tok, "llama2_chat", 2)


@pytest.mark.parametrize("template", ["llama2_chat", "openchat_3.5", "chatml", "raw", "tokenizer"])
@pytest.mark.parametrize("max_length", [512, 24])
def test_every_template_prefix_and_reward(template, max_length, tok, oc_tok):
    t_ = oc_tok if template == "openchat_3.5" else tok
    msgs = parse_hh(MULTI)
    answers = ["Fine, thanks for asking!", "", "Ünïcödé 🙂"]
    out = tokenize_answers(t_, msgs, answers, template, max_length)
    add_special = template != "tokenizer"
    for a, ta in zip(answers, out):
        seq = ta.tokens.tolist()
        assert len(seq) <= max_length and ta.reward_index == len(seq) - 1
        if not ta.truncated:
            full = t_(render(t_, msgs, template, answer=a), add_special_tokens=add_special).input_ids
            prompt = t_(render(t_, msgs, template), add_special_tokens=add_special).input_ids
            assert seq == full and seq[:ta.answer_start] == prompt[:ta.answer_start]
            assert ta.answer_start >= len(prompt) - 1
            if a:
                got = t_.decode(seq[ta.answer_start:ta.answer_start + ta.answer_length]).strip()
                assert got == a
        end = {"llama2_chat": [2], "tokenizer": [2], "raw": [2], "openchat_3.5": [32000],
               "chatml": t_("x<|im_end|>", add_special_tokens=False).input_ids[-1:]}[template]
        assert seq[-1:] == end
    if max_length == 24:
        assert any(ta.truncated for ta in out)
