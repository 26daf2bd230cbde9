"""Hand-written rows → expected tokens and reward index."""

import pytest

from starling_jax.data.chat import parse_hh
from starling_jax.data.nectar import validate_row
from starling_jax.data.tokenize import RowDoesNotFit, tokenize_answers, tokenize_ranking

MULTI = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"


def row(prompt, answers, ranks):
    return validate_row(
        {
            "prompt": prompt,
            "answers": [{"answer": a, "model": f"m{i}", "rank": r} for i, (a, r) in enumerate(zip(answers, ranks))],
        },
        1,
    )


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
        assert t.answer_start[j] == len(prompt) and want[: len(prompt)] == prompt
        assert tok.decode(want[t.answer_start[j] : t.answer_start[j] + t.answer_lengths[j]]).strip() == a
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
    assert tok.decode(t.tokens[0][t.answer_start[0] : t.answer_start[0] + t.answer_lengths[0]]).strip() == a


def test_empty_answer(tok):
    r = row("\n\nHuman: Say nothing.\n\nAssistant:", ["", "something"], [1, 2])
    t = tokenize_ranking(r, tok, "llama2_chat", 64)
    want = ids(tok, "[INST] Say nothing. [/INST] </s>")
    assert t.tokens[0].tolist() == want
    assert t.answer_lengths[0] == 0 and t.reward_index[0] == len(want) - 1 and want[-1] == tok.eos_token_id


def test_left_truncation_keeps_answer_ends_and_one_shared_context(tok):
    """Starling's policy: cut from the left; every answer keeps its end and its own </s>; one prompt context."""
    answers = [" ".join(["word"] * 200), "short", " ".join(["word"] * 12)]
    r = row(MULTI, answers, [1, 2, 3])
    prompt_text = "[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST]"
    prompt = ids(tok, prompt_text)
    for max_length in (64, 30):
        t = tokenize_ranking(r, tok, "llama2_chat", max_length)
        assert t.truncated
        contexts = {tuple(t.tokens[j][: t.answer_start[j]].tolist()) for j in range(3)}
        assert len(contexts) == 1, "every answer must see the same prompt context"
        context = list(contexts.pop())
        # BOS kept, then the END of the prompt (a left cut), the same cut for every answer
        assert context[0] == tok.bos_token_id and context[1:] == prompt[len(prompt) - (len(context) - 1) :]
        assert len(set(t.prompt_cut.tolist())) == 1 and t.prompt_cut[0] == len(prompt) - len(context) > 0
        for j, a in enumerate(answers):
            full = ids(tok, f"{prompt_text} {a}</s>")
            seq = t.tokens[j].tolist()
            assert len(seq) <= max_length and t.reward_index[j] == len(seq) - 1
            # the answer's last tokens and the template's own </s> are kept: the sequence ends exactly as the
            # untruncated rendering does (a cut answer never gets a fresh </s>)
            tail = seq[t.answer_start[j] :]
            assert tail == full[len(full) - len(tail) :] and seq[-1] == tok.eos_token_id
            assert t.answer_lengths[j] == len(tail) - 1
        # the longest answer fills max_length and lost its beginning; the shorter ones are whole
        assert len(t.tokens[0]) == max_length and t.answer_cut[0] > 0
        assert t.answer_cut[1] == 0 and t.answer_cut[2] == 0


def test_left_truncation_of_the_prompt_only(tok):
    """When cutting the prompt is enough, every answer is whole and the longest fills max_length exactly."""
    answers = [" ".join(["word"] * 12), "short"]
    r = row(MULTI, answers, [1, 2])
    prompt_text = "[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST]"
    full = [ids(tok, f"{prompt_text} {a}</s>") for a in answers]
    max_length = len(full[0]) - 5
    t = tokenize_ranking(r, tok, "llama2_chat", max_length)
    assert t.prompt_cut.tolist() == [5, 5] and t.answer_cut.tolist() == [0, 0]
    for j in range(2):
        # exactly the untruncated tokens with 5 tokens after the BOS removed
        assert t.tokens[j].tolist() == full[j][:1] + full[j][6:]
    assert len(t.tokens[0]) == max_length


def test_cannot_fit(tok):
    r = row(MULTI, ["a", "b"], [1, 2])
    with pytest.raises(RowDoesNotFit, match="cannot fit"):
        tokenize_ranking(r, tok, "llama2_chat", 2)


# Expected renderings written by hand from each format's definition (not produced by `render`).
EXPECTED = {
    "llama2_chat": ("[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST] {a}</s>", True),
    "tokenizer": ("[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST] {a}</s>", False),
    "openchat_3.5": (
        "GPT4 Correct User: Hi there<|end_of_turn|>GPT4 Correct Assistant: Hello!<|end_of_turn|>"
        "GPT4 Correct User: How are you?<|end_of_turn|>GPT4 Correct Assistant: {a}<|end_of_turn|>",
        True,
    ),
    "chatml": (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>",
        True,
    ),
    "raw": ("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: {a}</s>", True),
}


@pytest.mark.parametrize("template", sorted(EXPECTED))
@pytest.mark.parametrize("max_length", [512, 24])
def test_every_template_prefix_and_reward(template, max_length, tok, oc_tok):
    t_ = oc_tok if template == "openchat_3.5" else tok
    msgs = parse_hh(MULTI)
    answers = ["Fine, thanks for asking!", "", "Ünïcödé 🙂"]
    out = tokenize_answers(t_, msgs, answers, template, max_length)
    text, add_special = EXPECTED[template]
    prompt_text = text[: text.index("{a}")].rstrip(" ")
    for a, ta in zip(answers, out):
        seq = ta.tokens.tolist()
        full = t_(text.format(a=a), add_special_tokens=add_special).input_ids
        prompt = t_(prompt_text, add_special_tokens=add_special).input_ids
        assert len(seq) <= max_length and ta.reward_index == len(seq) - 1
        if not ta.truncated:
            assert seq == full and seq[: ta.answer_start] == prompt[: ta.answer_start]
            assert ta.answer_start >= len(prompt) - 1
            if a:
                got = t_.decode(seq[ta.answer_start : ta.answer_start + ta.answer_length]).strip()
                assert got == a
        else:  # left truncation: the end of the rendering is kept exactly
            tail = seq[ta.answer_start :]
            assert tail == full[len(full) - len(tail) :]
        end = {
            "llama2_chat": [2],
            "tokenizer": [2],
            "raw": [2],
            "openchat_3.5": [32000],
            "chatml": t_("x<|im_end|>", add_special_tokens=False).input_ids[-1:],
        }[template]
        assert seq[-1:] == end
    if max_length == 24:
        assert any(ta.truncated for ta in out)
