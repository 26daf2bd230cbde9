"""The released Starling-RM-7B-alpha layout (a torch.save'd GPTRewardModel state dict) converts into a
LlamaForSequenceClassification folder whose rewards equal the model card's inference code."""

import json
import shutil

import numpy as np
import pytest

from .hf_fixtures import require_torch  # noqa: E402

torch = require_torch()

from starling_jax import convert_starling  # noqa: E402
from starling_jax.data.tokenizer import default_tokenizer_for, load_tokenizer  # noqa: E402
from starling_jax.errors import CheckpointError  # noqa: E402

from .hf_fixtures import make_hf_model  # noqa: E402


class GPTRewardModel(torch.nn.Module):
    """The model card's class (berkeley-nest/Starling-RM-7B-alpha), with transformers; PAD_ID as the card
    computes it unless given (the reference: the reward is read before the first PAD)."""

    def __init__(self, model_path, pad_id=None):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
        self.config = model.config
        self.config.n_embd = self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd
        self.model = model
        self.transformer = model.model
        self.v_head = torch.nn.Linear(self.config.n_embd, 1, bias=False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.pad_token = self.tokenizer.unk_token
        self.PAD_ID = self.tokenizer(self.tokenizer.pad_token)["input_ids"][0] if pad_id is None else pad_id

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None):
        bs = input_ids.shape[0]
        transformer_outputs = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, position_ids=position_ids
        )
        hidden_states = transformer_outputs[0]
        scores = []
        rewards = self.v_head(hidden_states).squeeze(-1)
        for i in range(bs):
            c_inds = (input_ids[i] == self.PAD_ID).nonzero()
            c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
            scores.append(rewards[i, c_ind - 1])
        return scores


SAMPLES = [
    "[INST] Hello, who are you? [/INST] I am a helpful assistant.</s>",
    "[INST] What is 2+2? [/INST] 4</s>",
    "[INST] Hi [/INST] Hello!</s> [INST] Tell me a joke about JAX. [/INST] It traced itself.</s>",
]


@pytest.fixture(scope="module")
def starling(tmp_path_factory):
    """A tiny Llama-2-shaped base folder and a GPTRewardModel pickle in exactly the released layout."""
    d = tmp_path_factory.mktemp("starling")
    base = make_hf_model(d / "base", "llama", "lm", vocab=32000, gqa=False, hidden=64, layers=2, heads=4)
    for f in default_tokenizer_for("llama2_chat").iterdir():
        shutil.copy(f, base / f.name)
    torch.manual_seed(0)
    rm = GPTRewardModel(str(base)).eval()
    with torch.no_grad():
        rm.v_head.weight.copy_(torch.randn(1, 64) / 8.0)
    sd = rm.state_dict()
    assert {"model.lm_head.weight", "v_head.weight"} <= set(sd)
    assert any(k.startswith("model.model.") for k in sd) and any(k.startswith("transformer.") for k in sd)
    torch.save(sd, d / "pytorch_model.bin")
    return d, base, rm


def card_rewards(rm, texts, pad_to=None):
    """The card's get_reward: tokenizer(truncation left, padding), then the forward above."""
    tok = rm.tokenizer
    tok.truncation_side = "left"
    tok.padding_side = "right"
    enc = tok(
        texts,
        truncation=True,
        max_length=pad_to or 2048,
        return_tensors="pt",
        padding="max_length" if pad_to else False,
    )
    with torch.no_grad():
        return torch.hstack(rm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])).double().numpy()


def test_released_layout_converts_and_matches_the_card(starling, converted):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d, base, rm = starling
    out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    # one unpadded sequence at a time: the card's own code path, whatever its PAD_ID
    card = np.array([card_rewards(rm, [t])[0] for t in SAMPLES])
    enc = tok(SAMPLES, padding=True, return_tensors="pt")  # right-padded with <unk>: HF's own pooling
    with torch.no_grad():
        ours_hf = hf(**enc).logits[:, 0].double().numpy()
    np.testing.assert_allclose(ours_hf, card, atol=1e-4, rtol=0)
    assert np.ptp(card) > 1e-3
    # padded batch, reward before the first PAD = <unk> (id 0), as starling.md states the rule
    rm0 = GPTRewardModel.__new__(GPTRewardModel)
    torch.nn.Module.__init__(rm0)
    rm0.transformer, rm0.v_head, rm0.tokenizer, rm0.PAD_ID = rm.transformer, rm.v_head, rm.tokenizer, 0
    np.testing.assert_allclose(card_rewards(rm0, SAMPLES, pad_to=64), card, atol=1e-4, rtol=0)
    # the exported chat template renders the Starling format exactly (these samples' tokens)
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert list(tok.apply_chat_template(conv, tokenize=True, return_dict=False)) == list(
        load_tokenizer(base)(SAMPLES[1])["input_ids"]
    )
    # starling_jax itself on the converted folder
    from starling_jax.model.hf_io import load_hf
    from starling_jax.parallel.sharding import MeshConfig, make_mesh

    from .hf_fixtures import forward

    ids = [tok(t)["input_ids"] for t in SAMPLES]
    length = max(map(len, ids))
    tokens = np.zeros((len(ids), length), np.int32)
    for i, r in enumerate(ids):
        tokens[i, : len(r)] = r
    lengths = np.array([len(r) for r in ids])
    real = np.arange(length)[None] < lengths[:, None]
    mesh = make_mesh(MeshConfig())
    cfg, graphdef, state = load_hf(out, "reward", mesh)
    ours = forward(
        cfg,
        graphdef,
        state,
        tokens,
        np.where(real, np.arange(length)[None], 0).astype(np.int32),
        real.astype(np.int32),
        role="reward",
        mesh=mesh,
        reward_index=(lengths - 1).astype(np.int32),
    )
    np.testing.assert_allclose(ours, card, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def converted(starling, tmp_path_factory):
    d, base, _ = starling
    out = tmp_path_factory.mktemp("converted") / "hf"
    assert convert_starling.main(["--input", str(d), "--base", str(base), "--output", str(out)]) == 0
    return out


def test_other_layouts_give_the_same_folder(starling, converted, tmp_path):
    """`transformer.*` alone, `model.model.*` alone (no LM head): the same tensors as the full layout."""
    from safetensors.numpy import load_file

    d, base, _ = starling
    full = load_file(str(converted / "model.safetensors"))
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    for drop in ("model.model.", "transformer."):
        part = {k: v for k, v in sd.items() if not k.startswith(drop) and k != "model.lm_head.weight"}
        torch.save(part, tmp_path / "w.pt")
        out = tmp_path / drop.strip(".")
        convert_starling.convert(str(tmp_path / "w.pt"), str(base), str(out))
        got = load_file(str(out / "model.safetensors"))
        assert sorted(got) == sorted(full) and all(np.array_equal(got[k], full[k]) for k in got)


def test_bad_pickles_are_one_line_errors(starling, tmp_path, capsys):
    d, base, _ = starling

    class Evil:  # noqa: B903 - a pickled object: code to run on load
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"v_head.weight": torch.zeros(1, 64), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_starling.convert(str(tmp_path / "evil.pt"), str(base), str(tmp_path / "o1"))
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    key = next(k for k in sd if k.startswith("transformer."))
    sd[key] = sd[key] + 1
    torch.save(sd, tmp_path / "differ.pt")
    with pytest.raises(CheckpointError, match="must be equal"):
        convert_starling.convert(str(tmp_path / "differ.pt"), str(base), str(tmp_path / "o2"))
    (tmp_path / "trunc.pt").write_bytes((d / "pytorch_model.bin").read_bytes()[:5000])
    rc = convert_starling.main(
        ["--input", str(tmp_path / "trunc.pt"), "--base", str(base), "--output", str(tmp_path / "o3")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "trunc.pt" in err[0]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_no_arguments_offline_is_one_line_naming_the_hub_id(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = convert_starling.main([])
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "berkeley-nest/Starling-RM-7B-alpha" in err[0]
    assert json.loads(cap.out.strip().splitlines()[-1])["status"] == "error"


def test_sharded_export_and_conversion_share_one_planner_and_load_in_transformers(starling, converted, tmp_path):
    """A small max shard size: convert_starling and save_hf (the same model, loaded back) write the same files and
    the same transformers index (huggingface_hub's planner; transformers' index layout), and transformers loads
    both folders to the single-file conversion's rewards."""
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from starling_jax.model.hf_io import load_hf, save_hf
    from starling_jax.parallel.sharding import MeshConfig, make_mesh

    d, base, _ = starling
    max_bytes = 200_000  # the 8 MB embedding alone in a file, the layers over several more
    conv = tmp_path / "conv"
    argv = ["--input", str(d), "--base", str(base), "--output", str(conv), "--max-shard-size", str(max_bytes)]
    assert convert_starling.main(argv) == 0
    cfg, _, state = load_hf(converted, "reward", make_mesh(MeshConfig()))
    exp = save_hf(tmp_path / "exp", cfg, state, "reward", tokenizer_dir=converted, max_shard_bytes=max_bytes)

    index = json.loads((conv / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and not (conv / "model.safetensors").exists()
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in conv.glob("model-*-of-*.safetensors"))
    assert all(f == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files))
    assert index == json.loads((exp / "model.safetensors.index.json").read_text())  # one planner, one format
    full = load_file(str(converted / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in full.values())
    for f in files:
        shard = load_file(str(conv / f))
        assert sorted(shard) == sorted(k for k, v in index["weight_map"].items() if v == f)
        assert all(np.array_equal(shard[k], full[k]) for k in shard)

    tok = AutoTokenizer.from_pretrained(str(converted))
    enc = tok(SAMPLES, padding=True, return_tensors="pt")

    def rewards(folder):
        hf = AutoModelForSequenceClassification.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            return hf(**enc).logits[:, 0].numpy()

    single = rewards(converted)  # the tensors are equal bit for bit (above); torch's CPU kernels vary by 1 ulp
    np.testing.assert_allclose(rewards(conv), single, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rewards(exp), single, rtol=1e-6, atol=1e-6)
    assert np.ptp(single) > 1e-3
