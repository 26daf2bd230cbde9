"""A run writes to, stops and resumes from a `gs://` output_dir, reads `data.train` from `gs://`, and `export_hf
--checkpoint` / `score --model` read the URL: against an in-process Cloud Storage server (tests/fake_gcs.py), so
the code opens real gs:// URLs (Orbax/TensorStore for arrays, epath for every other file) with no network."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from starling_jax.data.synthetic import generate, write_jsonl
from tests.entrypoints import entry_cmd, env_with, losses, summary
from tests.fake_gcs import BUCKET, fake_gcs

FAST = [
    "train.steps=32",
    "train.log_every=1",
    "train.eval_every=100",
    "train.save_every=4",
    "train.progress_bar=false",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.eval_fraction=0.2",
    "optim.warmup_steps=2",
]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env_with(1, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> dict:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return summary(stdout)


def _remote_losses(url: str) -> dict[int, float]:
    from etils import epath

    rows = {}
    for line in epath.Path(url, "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row["loss"]
    return rows


@pytest.mark.slow  # four entry-point runs (two at a time): ~75 s on an idle 2-core machine, 165 s under CI load
def test_run_writes_stops_resumes_and_exports_through_gs_urls(tmp_path):
    from etils import epath
    from safetensors.numpy import load_file

    from starling_jax.paths import local_copy

    rows = generate(120, seed=3)
    local_data = write_jsonl(rows, tmp_path / "small.jsonl")
    with fake_gcs() as env:
        bucket = f"gs://{BUCKET}"
        data, run = f"{bucket}/data/small.jsonl", f"{bucket}/runs/rm"
        epath.Path(data).write_bytes(local_data.read_bytes())
        url_args = ["export.hf=true", "export.plot=true"]

        # an uninterrupted local run (the reference) and the gs:// run, side by side
        # the reference and the resumed run save only at their end (train.save_every may change on resume): the
        # stopped run's checkpoints are the ones the resume is tested from
        once = "train.save_every=32"
        reference = _start(
            entry_cmd(
                "train_rm", tmp_path / "straight", local_data, *FAST, once, "export.hf=false", "export.plot=false"
            ),
            env,
        )
        first = _start(entry_cmd("train_rm", run, data, *FAST, *url_args), env)
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if epath.Path(run, "metrics.jsonl").exists():  # copied up at the first checkpoint (step 4)
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # a preemption: save at the next step boundary, exit
        stopped = _finish(first)
        assert stopped["status"] == "preempted", "the run finished before it could be stopped"
        assert stopped["output_dir"] == run and stopped["checkpoint_dir"] == f"{run}/checkpoints"
        _finish(reference)
        ref = losses(tmp_path / "straight")
        assert sorted(ref) == list(range(1, 33))

        resumed = _finish(_start(entry_cmd("train_rm", run, data, *FAST, once, *url_args), env))
        assert resumed["status"] == "completed" and resumed["resumed_from"] == stopped["steps"]
        assert resumed["hf_export_dir"] == f"{run}/hf"
        got = _remote_losses(run)
        assert sorted(got) == sorted(ref)
        np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=0, atol=1e-6)
        out = epath.Path(run)
        for name in ("config.yaml", "summary.png", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"):
            assert (out / name).is_file(), name
        assert len(list((out / "tensorboard").glob("events.*"))) == 2  # one event file per run
        assert not any(p.name.startswith(".") for p in out.iterdir())  # no lock file, no temporary folder

        # export_hf reads the checkpoint URL, score the HF folder URL (and writes its output there)
        from starling_jax.data.nectar import split_of

        evals = [
            line
            for line, row in zip(local_data.read_text().splitlines(keepends=True), rows)
            if split_of(row["prompt"], 0.2) == "eval"
        ]
        sample = f"{bucket}/data/eval_rows.jsonl"
        epath.Path(sample).write_text("".join(evals))
        export = _start(
            [sys.executable, "-m", "starling_jax.export_hf", "--checkpoint", run, "--output", f"{bucket}/export"], env
        )
        score = _start(
            [
                sys.executable,
                "-m",
                "starling_jax.score",
                "--model",
                f"{run}/hf",
                "--data",
                sample,
                "--output",
                f"{bucket}/scores.jsonl",
            ],
            env,
        )
        exported, scored = _finish(export), _finish(score)
        assert exported["output_dir"] == f"{bucket}/export" and exported["role"] == "reward"
        a, b = (load_file(local_copy(u) / "model.safetensors") for u in (f"{bucket}/export", f"{run}/hf"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        # the run's last eval was on exactly these rows with the same parameters
        assert scored["rows_scored"] == len(evals) == resumed["eval_prompts"]
        assert scored["pairwise_accuracy"] == pytest.approx(resumed["eval_pairwise_accuracy"], abs=1e-6)
        for rank, value in resumed["eval_mean_reward_by_rank"].items():
            assert scored["mean_reward_by_rank"][rank] == pytest.approx(value, abs=1e-4)
        lines = epath.Path(f"{bucket}/scores.jsonl").read_text().splitlines()
        assert [json.loads(line)["row"] for line in lines] == list(range(1, len(evals) + 1))


def test_local_copy_refreshes_changed_files(tmp_path, monkeypatch):
    from etils import epath

    from starling_jax.paths import local_copy, upload_folder

    monkeypatch.setenv("STARLING_JAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "a.bin").write_bytes(b"abc")
    with fake_gcs():
        url = f"gs://{BUCKET}/folder"
        epath.Path(url, "stale.txt").write_text("old")
        upload_folder(src, url)  # replaces what was there
        assert sorted(p.name for p in epath.Path(url).iterdir()) == ["config.json", "sub"]
        assert [p.name for p in epath.Path(url, "sub").iterdir()] == ["a.bin"]
        copy = local_copy(url)
        assert copy == tmp_path / "cache" / "remote" / "gs" / BUCKET / "folder"
        assert (copy / "sub" / "a.bin").read_bytes() == b"abc" and (copy / "config.json").read_text() == "{}"
        epath.Path(url, "sub", "a.bin").write_bytes(b"abcd")
        assert (local_copy(url) / "sub" / "a.bin").read_bytes() == b"abcd"
        with pytest.raises(FileNotFoundError):
            local_copy(f"gs://{BUCKET}/nothing")


@pytest.mark.slow  # two train_ppo runs of tiny models (the second resumes; the compile cache is shared): ~2 min
def test_ppo_run_on_gs_stops_resumes_and_exports(tmp_path):
    """train_ppo with its models, prompts and output_dir in the bucket: a run stopped by its step limit after
    iteration 1, resumed to 2 and exported; checkpoints, samples.jsonl (appended across the runs) and the HF folder
    end up in the bucket."""
    import shutil

    from etils import epath

    from starling_jax import hub
    from starling_jax.data.chat import to_hh
    from starling_jax.data.tokenizer import default_tokenizer_dir
    from starling_jax.errors import CheckpointError
    from starling_jax.paths import upload_folder
    from tests.model.hf_fixtures import make_hf_model

    tok = default_tokenizer_dir("llama2_chat")
    policy = make_hf_model(tmp_path / "policy", "mistral", head="lm", vocab=32000, layers=2, sliding_window=4096)
    rm = make_hf_model(tmp_path / "rm", "llama", head="score", vocab=32000, layers=2, seed=1)
    for folder in (policy, rm):
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    assert (policy / "generation_config.json").is_file()
    questions = ["What is the capital of France?", "Name a colour.", "Tell me a joke.", "How are you?"]
    prompts = "".join(
        json.dumps({"prompt": to_hh([{"role": "user", "content": f"{q} ({i})"}])}) + "\n"
        for i in range(6)
        for q in questions
    )
    with fake_gcs() as env:
        bucket = f"gs://{BUCKET}"
        run = f"{bucket}/runs/ppo"
        upload_folder(policy, f"{bucket}/models/policy")
        upload_folder(rm, f"{bucket}/models/rm")
        epath.Path(f"{bucket}/data/prompts.jsonl").write_text(prompts)
        with pytest.raises(CheckpointError, match=f"^policy={bucket}/models/nothing: no such model folder$"):
            hub.resolve(f"{bucket}/models/nothing", key="policy")
        args = [
            f"policy={bucket}/models/policy",
            f"reward_model={bucket}/models/rm",
            f"prompts.train={bucket}/data/prompts.jsonl",
            f"output_dir={run}",
            "prompts.eval_prompts=8",
            "rollout.batch_size=8",
            "rollout.minibatch_size=8",
            "rollout.max_new_tokens=6",
            "prompts.max_prompt_tokens=32",
            "train.progress_bar=false",
            "export.plot=false",
        ]
        cache = {"STARLING_JAX_CACHE": str(tmp_path / "cache")}  # the models' local copies
        cmd = [sys.executable, "-m", "starling_jax.train_ppo", *args]
        stopped = _finish(_start([*cmd, "train.steps=1", "export.hf=false"], {**env, **cache}), timeout=600)
        assert stopped["status"] == "completed" and stopped["steps"] == 1 and stopped["hf_export_dir"] is None
        resumed = _finish(_start([*cmd, "train.steps=2"], {**env, **cache}), timeout=600)
        assert resumed["status"] == "completed" and resumed["resumed_from"] == 1 and resumed["steps"] == 2, resumed
        assert resumed["output_dir"] == run and resumed["hf_export_dir"] == f"{run}/hf"

        out = epath.Path(run)
        assert {p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()} == {"1", "2"}
        assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        assert [s["iteration"] for s in samples] == [0, 1, 2]  # start, end of run 1, end of the resumed run
        assert all(len(s["samples"]) == 4 and isinstance(s["samples"][0]["completion"], str) for s in samples)
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ):
            assert (out / "hf" / name).is_file(), name
        assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
        assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary folder left
