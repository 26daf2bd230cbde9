"""`hub.py::resolve`: a local folder, a cached Hub id offline, a missing one, a pickle-only snapshot, and the
files it asks huggingface_hub for (filtered by huggingface_hub's own pattern matcher)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save

from starling_jax import hub
from starling_jax.errors import CheckpointError
from tests.hub_cache import add_to_hub_cache

CONFIG = json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}).encode()
WEIGHTS = save({"model.embed_tokens.weight": np.zeros((4, 2), np.float32)})
TOKENIZER = {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HOME under tmp_path with HF_HUB_OFFLINE=1 (huggingface_hub reads both when imported, so this
    process's constants are patched; subprocesses get the environment variables)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_local_folder_is_kept_and_bad_paths_are_one_line(tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"^policy=.*file\.json: not a folder \(give the model folder"):
        hub.resolve(tmp_path / "file.json", key="policy")
    with pytest.raises(
        CheckpointError,
        match=r"^--model=.*/nope/deeper: no such model folder \(give a local folder, "
        r"a gs:// URL or a HuggingFace Hub id like org/name\)$",
    ):
        hub.resolve(tmp_path / "nope" / "deeper", key="--model")
    with pytest.raises(CheckpointError, match=r"^tokenizer \./x/y: no such tokenizer folder"):
        hub.resolve("./x/y", files="tokenizer")


def test_cached_hub_id_resolves_offline_to_its_snapshot(offline_cache):
    snapshot = add_to_hub_cache(
        offline_cache, "org/tiny", {"config.json": CONFIG, "model.safetensors": WEIGHTS, **TOKENIZER}
    )
    assert hub.resolve("org/tiny", key="policy") == snapshot
    assert hub.resolve("org/tiny", files="tokenizer") == snapshot
    assert hub.resolve("org/tiny", files="config") == snapshot
    # the tokenizer resolver of data.tokenizer / --tokenizer is the same function
    from starling_jax.data.tokenizer import resolve_tokenizer_dir

    assert resolve_tokenizer_dir("org/tiny", key="data.tokenizer") == snapshot


def test_missing_hub_id_offline_is_one_whole_line_naming_it(offline_cache):
    with pytest.raises(CheckpointError) as e:
        hub.resolve("no-such-org/no-such-model", key="reward_model")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "reward_model=no-such-org/no-such-model: not a local folder, and not in the HuggingFace Hub "
        f"cache {offline_cache / 'hub'} (HF_HUB_OFFLINE=1 reads only the cache)"
    ), msg
    assert "`hf download no-such-org/no-such-model --include '*.safetensors' --include '*.json'" in msg
    assert msg.endswith("or pass a local folder"), msg


def test_snapshot_without_safetensors_names_convert_starling(offline_cache):
    from starling_jax import convert_starling

    add_to_hub_cache(offline_cache, hub.STARLING_RM_ALPHA, {"config.json": CONFIG, **TOKENIZER})
    with pytest.raises(CheckpointError) as e:
        hub.resolve(hub.STARLING_RM_ALPHA, key="reward_model")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"reward_model={hub.STARLING_RM_ALPHA}: the Hub snapshot ")
    assert "has no safetensors weights" in msg and "`python -m starling_jax.convert_starling`" in msg
    # the command's defaults are the ones the message relies on
    assert (hub.STARLING_RM_ALPHA, hub.STARLING_RM_ALPHA_OUTPUT) == (
        convert_starling.DEFAULT_INPUT,
        convert_starling.DEFAULT_OUTPUT,
    )
    # config + tokenizer (convert_starling --base) need no weights; a tokenizer needs its files
    assert hub.resolve(hub.STARLING_RM_ALPHA, files="config").is_dir()
    add_to_hub_cache(offline_cache, "org/weights-only", {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    with pytest.raises(CheckpointError, match=r"^tokenizer org/weights-only: the Hub snapshot .* has no tokenizer"):
        hub.resolve("org/weights-only", files="tokenizer")


# A model repository as the Hub lists it: transformers weights in safetensors and in pickles, the raw-format copy,
# training leftovers.
REPO_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "added_tokens.json",
    "consolidated.safetensors",
    "original/params.json",
    "original/consolidated.00.pth",
    "training_args.bin",
    "optimizer.pt",
    "rng_state.pth",
    "model.ckpt",
    "flax_model.msgpack",
    "tf_model.h5",
    "scheduler.pkl",
]
TOKENIZER_FILES = {
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "added_tokens.json",
}
CONFIG_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    *TOKENIZER_FILES,
}


@pytest.mark.parametrize(
    "files,expected",
    [
        ("model", CONFIG_FILES | {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}),
        ("config", CONFIG_FILES),
        ("tokenizer", TOKENIZER_FILES),
    ],
)
def test_only_allowed_files_are_requested(monkeypatch, tmp_path, files, expected):
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    (tmp_path / "config.json").write_bytes(CONFIG)
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert hub.resolve("org/name", files=files) == tmp_path
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/name" and kwargs["revision"] is None
    # what snapshot_download keeps of the repository's listing (its own filter, the same call)
    kept = set(
        filter_repo_objects(
            REPO_FILES, allow_patterns=kwargs["allow_patterns"], ignore_patterns=kwargs["ignore_patterns"]
        )
    )
    assert kept == expected
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for name in kept)


def test_unreachable_hub_is_one_line_cut_between_words(monkeypatch):
    """Online but the Hub cannot be reached: the cause is shortened between words, the hint is whole."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    words = " ".join(f"word{i}" for i in range(200))  # 1,289 characters, newlines inside

    def unreachable(repo_id, **kwargs):
        try:
            raise ConnectionError(words.replace("word50 ", "word50\n"))
        except ConnectionError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from e

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        hub.resolve("org/name", key="init_from")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        "init_from=org/name: not a local folder, and not fetched from the "
        "HuggingFace Hub (ConnectionError: word0 word1 "
    )
    cause = msg[msg.index("(ConnectionError: ") + len("(ConnectionError: ") : msg.index(" ...); download it with")]
    n = len(cause.split(" "))
    assert len(cause) <= 200 and cause.split(" ") == [f"word{i}" for i in range(n)]  # whole words only
    assert msg.endswith("or pass a local folder; offline: HF_HUB_OFFLINE=1 reads only the cache"), msg


MISSING = "no-such-org/no-such-model"


@pytest.mark.parametrize(
    "case",
    [
        "generate",
        "score",
        "verify_hf",
        "convert_starling",
        "train_rm.init_from",
        "train_sft.init_from",
        "train_rm.data.tokenizer",
        "prepare_data",
    ],
)
def test_every_model_reference_goes_through_the_resolver(case, offline_cache, tmp_path, capsys):
    """Each entry point's model or tokenizer reference is resolved by `hub.resolve` with the key the user typed: a
    Hub id that is not cached, offline, is the resolver's one line naming that key."""
    import importlib

    from starling_jax.data.synthetic import BUNDLED_ALIAS

    out = f"output_dir={tmp_path / 'out'}"
    module, argv, key = {
        "generate": ("generate", ["--model", MISSING, "--prompt", "hi"], "--model"),
        "score": ("score", ["--model", MISSING, "--data", BUNDLED_ALIAS], "--model"),
        "verify_hf": ("verify_hf", ["--model", MISSING], "--model"),
        "convert_starling": (
            "convert_starling",
            ["--input", str(tmp_path / "weights.bin"), "--base", MISSING, "--output", str(tmp_path / "converted")],
            "--base",
        ),
        "train_rm.init_from": ("train_rm", [out, f"init_from={MISSING}"], "init_from"),
        "train_sft.init_from": ("train_sft", [out, f"init_from={MISSING}"], "init_from"),
        "train_rm.data.tokenizer": ("train_rm", [out, f"data.tokenizer={MISSING}"], "data.tokenizer"),
        "prepare_data": (
            "prepare_data",
            ["--input", BUNDLED_ALIAS, "--output", str(tmp_path / "prepared"), "--tokenizer", MISSING],
            "--tokenizer",
        ),
    }[case]
    (tmp_path / "weights.bin").write_bytes(b"not opened before --base is resolved")
    assert importlib.import_module(f"starling_jax.{module}").main(argv) == 2
    cap = capsys.readouterr()
    err = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in cap.err, cap.err
    assert err[0].startswith(f"error: {key}={MISSING}: not a local folder, and not in the HuggingFace Hub cache "), err
    assert err[0].endswith("or pass a local folder")
