"""The HF export carries the training format: a tiny Llama-shaped `init_from` whose tokenizer has Llama-2-chat's
official chat template (BOS on every turn, a space before `</s>`) and pad = eos, trained with
data.template=llama2_chat. The export's `apply_chat_template` must give the training tokens and transformers'
`AutoModelForSequenceClassification` (its own pooling, right-padded batches) our rewards."""

import json
import shutil

import numpy as np
import pytest

from .hf_fixtures import require_torch  # noqa: E402

require_torch()

from starling_jax import score, train_rm  # noqa: E402
from starling_jax.data.chat import parse_hh  # noqa: E402
from starling_jax.data.tokenize import tokenize_answers  # noqa: E402
from starling_jax.data.tokenizer import default_tokenizer_for, load_tokenizer, safe_pad_id  # noqa: E402
from starling_jax.errors import CheckpointError  # noqa: E402

from .hf_fixtures import make_hf_model, rewrite_config  # noqa: E402

# meta-llama/Llama-2-7b-chat-hf's chat_template (tokenizer_config.json), verbatim
LLAMA2_CHAT_OFFICIAL = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
PROMPTS = [
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a {w} fruit.\n\nAssistant:",
    "\n\nHuman: Say something {w}.\n\nAssistant:",
]


def rows():
    out = []
    for i in range(12):
        w = ["red", "green", "sweet", "sour"][i % 4] + str(i)
        out.append(
            {
                "prompt": PROMPTS[i % 2].format(w=w),
                "answers": [
                    {"answer": f"A {w} apple, number {i}.", "model": "a", "rank": 1},
                    {"answer": f"No {w}.", "model": "b", "rank": 2},
                    {"answer": "", "model": "c", "rank": 3},
                ],
            }
        )
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama2_format")
    init = make_hf_model(d / "init", "llama", "lm", vocab=32000, gqa=False, hidden=64, layers=2, heads=4)
    for f in default_tokenizer_for("llama2_chat").iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, init / f.name)
    (init / "chat_template.jinja").write_text(LLAMA2_CHAT_OFFICIAL)
    cfg = json.loads((init / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "</s>"  # pad = eos, as many Llama/Mistral tokenizers are configured
    (init / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = d / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = d / "run"
    rc = train_rm.main(
        [
            f"output_dir={out}",
            f"init_from={init}",
            "data.template=llama2_chat",
            f"data.train={data}",
            f"data.eval={data}",
            "data.max_length=128",
            "data.batch_size=8",
            "train.steps=2",
            "train.eval_every=2",
            "train.save_every=2",
            "export.plot=false",
            "train.progress_bar=false",
            "optim.warmup_steps=1",
            "optim.learning_rate=0.05",
        ]
    )
    assert rc == 0
    return init, data, out


def conversations():
    for r in rows():
        msgs = parse_hh(r["prompt"])
        for a in r["answers"]:
            yield msgs, a["answer"]


def test_export_chat_template_renders_the_training_tokens(run):
    from transformers import AutoTokenizer

    init, _, out = run
    init_tok = load_tokenizer(init)
    exported = AutoTokenizer.from_pretrained(str(out / "hf"))
    differs = 0
    for msgs, answer in conversations():
        want = tokenize_answers(init_tok, msgs, [answer], "llama2_chat", 128)[0].tokens.tolist()
        conv = [*msgs, {"role": "assistant", "content": answer}]
        got = exported.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert list(got) == want
        official = init_tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        differs += list(official) != want
    assert differs > 0  # init_from's own template would have given other tokens


def test_pad_eq_eos_replaced_and_hf_pooling_gives_our_rewards(run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    init, data, out = run
    hf = out / "hf"
    config = json.loads((hf / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert config["pad_token_id"] == tok.pad_token_id == 0 != tok.eos_token_id  # <unk>, the Starling rule
    assert config["starling_jax_data"]["template"] == "llama2_chat"
    # our rewards: score on the checkpoint (defaults to the recorded template) and on the HF export
    ours = {}
    for name, model in (("ckpt", out), ("hf", hf)):
        summary = score.score(str(model), str(data), str(tmp_path / f"{name}.jsonl"))
        assert summary["template"] == ("llama2_chat" if name == "ckpt" else "tokenizer")
        ours[name] = np.concatenate([json.loads(line)["rewards"] for line in open(tmp_path / f"{name}.jsonl")])
    np.testing.assert_allclose(ours["hf"], ours["ckpt"], atol=1e-5, rtol=0)
    # transformers on the export: rendered by its chat template, right-padded with its pad id, its own pooling
    convs = [[*m, {"role": "assistant", "content": a}] for m, a in conversations()]
    batch = tok.apply_chat_template(convs, tokenize=True, padding=True, return_tensors="pt", return_dict=True)
    assert tok.padding_side == "right" or batch["attention_mask"][:, -1].all()

    def hf_rewards(folder):
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            return model(**batch).logits[:, 0].double().numpy()

    ref = hf_rewards(hf)
    np.testing.assert_allclose(ours["ckpt"], ref, atol=1e-4, rtol=0)
    assert np.ptp(ref) > 1e-3  # rewards differ between answers: the comparison means something
    # with pad = eos left in config.json, HF would read every reward one token early
    bad = tmp_path / "pad_eos"
    shutil.copytree(hf, bad)
    rewrite_config(bad, pad_token_id=tok.eos_token_id)
    assert np.abs(hf_rewards(bad) - ref).max() > 1e-3


def test_export_hf_refuses_a_non_empty_output_unless_overwrite(run, capsys):
    from starling_jax import export_hf

    _, _, out = run
    rc = export_hf.main(["--checkpoint", str(out), "--output", str(out / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    before = (out / "hf" / "config.json").read_text()
    assert export_hf.main(["--checkpoint", str(out), "--output", str(out / "hf"), "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and (out / "hf" / "config.json").read_text() == before
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_score_refuses_another_template_than_the_recorded_one(run):
    from starling_jax.errors import DataError

    _, data, out = run
    with pytest.raises(DataError, match="template llama2_chat.*template chatml"):
        score.score(str(out), str(data), template="chatml")


def test_no_safe_pad_is_refused():
    tok = load_tokenizer(default_tokenizer_for("llama2_chat"))
    tok.pad_token = "</s>"
    assert safe_pad_id(tok, "llama2_chat", "x") == tok.unk_token_id
    tok.unk_token = "</s>"  # no other candidate left
    with pytest.raises(CheckpointError, match="pad token '</s>'.*reward"):
        safe_pad_id(tok, "llama2_chat", "out_dir")
