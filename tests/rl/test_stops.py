"""Completions cut at stop strings as thwu1/trlx's `decode(..., append_eos_token=True)` + re-tokenization does, on
crafted sampler outputs with the OpenChat 3.5 tokenizer (EOS `<|end_of_turn|>`)."""

import numpy as np
import pytest

from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
from starling_jax.rl.stops import cut_at_stop_strings, cut_text
from starling_jax.sample.chat import stop_token_sequences
from starling_jax.sample.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleOutput, rollout_arrays

STOP = "GPT4 Correct User:"
T = 24


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_tokenizer_dir("openchat_3.5", openchat_special_tokens=True))


def trlx_decode(tokenizer, sample: list[int], stop_sequences: list[str], finished: bool) -> str:
    """thwu1/trlx `AccelerateRLTrainer.decode`'s per-sample body (append_eos_token=True), transcribed; `finished`
    stands for its `sample[-1] == eos or pad` (the row ended on EOS before the longest row did)."""
    str_output = tokenizer.decode(sample, skip_special_tokens=True)
    trimmed = False
    if stop_sequences:
        for stop in stop_sequences:
            stop_ix = str_output.find(stop)
            if stop_ix >= 0:
                str_output = str_output[:stop_ix].rstrip()
                trimmed = True
    if trimmed or finished:
        str_output += tokenizer.eos_token
    return str_output


def test_cut_at_stop_strings_matches_trlx_decode(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    byte_split_stop = tok.convert_tokens_to_ids([f"<0x{c:02X}>" for c in STOP.encode()])  # one token per byte
    rows = [  # (sampled tokens, finish reason, the answer the row must end at or None = unchanged)
        (enc(f"Paris is the capital.\n{STOP}"), FINISH_STOP, "Paris is the capital."),
        (enc("Paris is the capital.") + [eos], FINISH_EOS, None),  # no stop string: unchanged
        (enc("one two three four five six seven eight nine ten eleven twelve")[:T], FINISH_LENGTH, None),
        (enc("Sure") + byte_split_stop + enc(" more"), FINISH_LENGTH, "Sure"),  # split into 18 byte tokens
        (enc(f"Paris. {STOP}"), FINISH_STOP, "Paris."),  # '▁G': one token holds the answer's space and 'G'
        (enc(f"Yes.  \n\n{STOP}"), FINISH_STOP, "Yes."),  # trailing whitespace stripped (trlx's rstrip)
        (enc(f"{STOP} hi"), FINISH_STOP, ""),  # nothing before the stop string: the response is EOS alone
    ]
    tokens = np.full((len(rows), T), pad, np.int32)
    for i, (ids, _, _) in enumerate(rows):
        tokens[i, : len(ids)] = ids
    lengths = np.array([len(ids) for ids, _, _ in rows], np.int32)
    reasons = np.array([r for _, r, _ in rows], np.int32)
    out = cut_at_stop_strings(tok, tokens, lengths, reasons, [STOP], eos, pad)

    for i, (ids, reason, answer) in enumerate(rows):
        got = out.tokens[i, : out.lengths[i]].tolist()
        assert (out.tokens[i, out.lengths[i] :] == pad).all()
        # the trained response is trlx's re-tokenized decode (without the BOS its `tokenizer(...)` prepends)
        want_text = trlx_decode(tok, ids, [STOP], reason == FINISH_EOS)
        assert tok.decode(got) == want_text, i
        assert STOP not in tok.decode(got) and STOP not in out.texts[i]
        if answer is None:  # a row without a stop string keeps its sampled tokens exactly
            assert got == ids and not out.cut[i] and out.ended[i] == (reason == FINISH_EOS)
            assert out.texts[i] == tok.decode(ids, skip_special_tokens=True)
        else:  # cut: the answer re-tokenized, then EOS; the RM's text is the answer alone
            assert got == enc(answer) + [eos] and out.cut[i] and out.ended[i], i
            assert out.texts[i] == answer
    # the sampler's token-level stop (generate.stop_token_sequences) ends rows 0 and 4 on their stop string; the
    # byte-split row 3 contains none of its token forms (the sampler ran on), and only the text rule cuts it
    seqs = stop_token_sequences(tok, [STOP])
    assert all(any(tuple(rows[i][0][-len(s) :]) == s for s in seqs) for i in (0, 4))
    row3 = rows[3][0]
    assert not any(tuple(row3[j : j + len(s)]) == s for s in seqs for j in range(len(row3)))

    # the rollout layout built from the cut rows: the response mask ends at the appended EOS
    p = 5
    prompts = np.full((len(rows), p), pad, np.int32)
    prompts[:, -2:] = enc("Hi")[:1] + [eos]
    arrays = rollout_arrays(
        prompts, np.full((len(rows),), 2, np.int32), SampleOutput(out.tokens, out.lengths, reasons, None, None)
    )
    mask = np.asarray(arrays["response_mask"])
    np.testing.assert_array_equal(mask.sum(1), out.lengths)
    assert np.asarray(arrays["tokens"])[0, p + out.lengths[0] - 1] == eos
    assert mask[0].sum() == len(enc("Paris is the capital.")) + 1 < lengths[0]


def test_no_stop_strings_and_trlx_trim_order():
    assert cut_text("a STOP b END c", []) == ("a STOP b END c", False)
    # each stop string in turn cuts what the previous ones left (trlx's loop), then rstrip
    assert cut_text("a END b STOP c", ["STOP", "END"]) == ("a", True)
    assert cut_text("x \n STOP", ["STOP"]) == ("x", True)
