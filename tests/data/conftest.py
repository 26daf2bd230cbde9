import json
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def tok_dir():
    from starling_jax.data.tokenizer import default_tokenizer_dir

    return default_tokenizer_dir("llama2_chat")


@pytest.fixture(scope="session")
def tok(tok_dir):
    from starling_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def oc_tok():
    from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer

    return load_tokenizer(default_tokenizer_dir("openchat_3.5", openchat_special_tokens=True))


def good_row(i, n=3, prompt=None):
    return {
        "prompt": prompt or f"\n\nHuman: question number {i}?\n\nAssistant:",
        "answers": [{"answer": f"answer {j} to {i}", "model": f"m{j}", "rank": float(j + 1)} for j in range(n)],
        "turns": 1,
        "num_responses": n,
        "source": ["test"],
        "good_natured": True,
    }


def write_mixed(path):
    """Good rows mixed with bad ones; returns (good row numbers, {bad row: reason fragment})."""
    lines = []
    good, bad = [], {}

    def add(obj, reason=None):
        lines.append(obj if isinstance(obj, str) else json.dumps(obj))
        (good.append(len(lines)) if reason is None else bad.__setitem__(len(lines), reason))

    add(good_row(1))
    r = good_row(2)
    del r["answers"][1]["rank"]
    add(r, "answers[1].rank' is missing")
    add(good_row(3, n=7))
    r = good_row(4)
    r["answers"][0]["rank"] = float("nan")
    add(r, "answers[0].rank' is nan")
    r = good_row(5, n=1)
    add(r, "at least 2")
    add(good_row(6))
    r = good_row(7)
    r["prompt"] = None
    add(r, "'prompt' is null")
    r = good_row(8)
    r["answers"] = "not a list"
    add(r, "'answers' is str")
    add('{"prompt": "\\n\\nHuman: broken', "not JSON")
    r = good_row(10)
    r["answers"][1]["rank"] = None
    add(r, "answers[1].rank' is missing")
    add(good_row(11, n=2))
    r = good_row(12)
    r["prompt"] = "\n\nHuman: hi\n\nAssistant: closed turn"
    add(r, "open")
    add(good_row(13))
    path.write_text("\n".join(lines) + "\n")
    return good, bad
