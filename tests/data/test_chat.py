import pytest

from starling_jax.data.chat import TEMPLATES, parse_hh, render, to_hh

MULTI = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"


def test_parse_multi_turn():
    msgs = parse_hh(MULTI)
    assert msgs == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert parse_hh(to_hh(msgs)) == msgs


@pytest.mark.parametrize(
    "bad,why",
    [
        ("Hello", "does not start"),
        ("\n\nHuman: hi\n\nAssistant: done", "open"),
        ("\n\nHuman: a\n\nHuman: b\n\nAssistant:", "alternate"),
        ("\n\nAssistant:", "alternate"),
        (None, "not a string"),
    ],
)
def test_parse_bad(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_hh(bad)


def test_render_exact(tok, oc_tok):
    msgs = parse_hh(MULTI)
    assert (
        render(tok, msgs, "llama2_chat", answer="Fine.")
        == "[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST] Fine.</s>"
    )
    assert render(tok, msgs, "llama2_chat") == "[INST] Hi there [/INST] Hello!</s> [INST] How are you? [/INST]"
    assert render(oc_tok, msgs, "openchat_3.5", answer="Fine.") == (
        "GPT4 Correct User: Hi there<|end_of_turn|>GPT4 Correct Assistant: Hello!<|end_of_turn|>"
        "GPT4 Correct User: How are you?<|end_of_turn|>GPT4 Correct Assistant: Fine.<|end_of_turn|>"
    )
    assert render(tok, msgs, "chatml", answer="Fine.") == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>"
    )
    assert render(tok, msgs, "raw", answer="Fine.") == MULTI + " Fine.</s>"
    assert render(tok, msgs, "raw") == MULTI
    # the tokenizer's own template is the stored llama2_chat one
    assert tok.chat_template == TEMPLATES["llama2_chat"]
    assert render(tok, msgs, "tokenizer", answer="x") == render(tok, msgs, "llama2_chat", answer="x")
