"""Mixed architectures: a Llama-2-chat-formatted, Llama-shaped reward model scores an OpenChat policy's completions
after re-rendering; the reward equals `score` on the same text. Shared-tokenizer declarations are checked."""

import json
import shutil

import numpy as np
import pytest

from starling_jax.data.chat import parse_hh, render
from starling_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
from starling_jax.errors import ConfigError
from starling_jax.eval.score_batches import jit_rewards
from starling_jax.model import hf_io
from starling_jax.parallel import sharding
from starling_jax.rl.rerender import check_shared_tokenizer, pack_sequences, rm_batch_from_text, rm_batch_from_tokens
from starling_jax.score import score
from tests.model.hf_fixtures import make_hf_model

PROMPTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    "\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?\n\nHuman: Tell me a joke about cats.\n\nAssistant:",
]
# What an OpenChat-format policy decoded (special tokens dropped) from its rollouts.
COMPLETIONS = ["Paris is the capital of France.", "Why did the cat sit on the computer? To keep an eye on the mouse!"]


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory):
    folder = make_hf_model(tmp_path_factory.mktemp("llama_rm"), "llama", head="score", vocab=32000, layers=2)
    for f in default_tokenizer_dir("llama2_chat").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_rerendered_reward_equals_score(llama_rm, tmp_path):
    tokenizer = load_tokenizer(llama_rm)
    conversations = [parse_hh(p) for p in PROMPTS]
    batch, truncated = rm_batch_from_text(
        tokenizer, "llama2_chat", conversations, COMPLETIONS, max_length=256, num_rows=8
    )
    assert not truncated.any() and batch["tokens"].shape == (8, 128)
    # The reward token is Llama-2-chat's closing </s> of the rendered conversation.
    for r, (conv, completion) in enumerate(zip(conversations, COMPLETIONS)):
        text = render(tokenizer, conv, "llama2_chat", answer=completion)
        assert text.endswith(completion + "</s>")
        assert batch["tokens"][r, batch["reward_index"][r]] == tokenizer.eos_token_id
    mesh = sharding.make_mesh(sharding.MeshConfig())
    _, graphdef, params = hf_io.load_hf(llama_rm, "reward", mesh)
    rewards = np.asarray(
        jit_rewards(graphdef, mesh)(
            params, batch["tokens"], batch["positions"], batch["segment_ids"], batch["reward_index"]
        )
    )[:2]

    data = tmp_path / "rollouts.jsonl"
    with open(data, "w") as f:
        for p, c in zip(PROMPTS, COMPLETIONS):
            f.write(
                json.dumps(
                    {
                        "prompt": p,
                        "answers": [
                            {"answer": c, "model": "policy", "rank": 1},
                            {"answer": "filler", "model": "x", "rank": 2},
                        ],
                    }
                )
                + "\n"
            )
    out = tmp_path / "scores.jsonl"
    score(str(llama_rm), str(data), str(out), template="llama2_chat", max_length=256, batch_size=8)
    want = [json.loads(line)["rewards"][0] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-5)
    assert abs(rewards[0] - rewards[1]) > 1e-4  # a random RM still tells the two conversations apart


def test_shared_tokenizer_path_and_declaration():
    openchat = load_tokenizer(default_tokenizer_dir("openchat_3.5", openchat_special_tokens=True))
    llama = load_tokenizer(default_tokenizer_dir("llama2_chat"))
    check_shared_tokenizer(llama, llama, "a", "b")  # same folder: fine
    with pytest.raises(ConfigError, match="vocabularies"):
        check_shared_tokenizer(openchat, llama, "runs/sft_default/hf", "runs/rm_default/hf")
    # Same tokenizer: the RM reads prompt + generated tokens unchanged, at the last generated token.
    batch = rm_batch_from_tokens([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], pad_id=0, pad_multiple=8)
    np.testing.assert_array_equal(batch["tokens"], [[1, 5, 6, 8, 9, 2, 0, 0], [1, 7, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["reward_index"], [5, 2])
    np.testing.assert_array_equal(batch["segment_ids"].sum(1), [6, 3])
    assert pack_sequences([[4]], 0, 8, num_rows=3)["tokens"].shape == (3, 8)
