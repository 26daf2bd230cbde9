"""What a new user hit (issue 22, item 7): each mistake is one `error: ...` line on stderr naming the file, row or
flag as typed, a JSON summary as the last stdout line, and exit code 2 — never usage text or a traceback.

Most entry points are called in-process (`main(argv)`, the same code `python -m` runs); the default-run chain of
`train_ppo` starts its child in a subprocess, as it does for a user."""

from __future__ import annotations

import json

import pytest

from starling_jax import (
    aot,
    base_configs,
    cli,
    convert_starling,
    export_hf,
    generate,
    prepare_data,
    score,
    train_ppo,
    train_rm,
    train_sft,
    verify_hf,
)
from starling_jax.config import load_config, save_config, to_dict
from starling_jax.data import synthetic
from starling_jax.data.nectar import split_of
from starling_jax.data.synthetic import bundled_path
from starling_jax.errors import ConfigError
from starling_jax.train import loop
from starling_jax.train.rm_config import RMRunConfig


def one_error(capsys) -> tuple[str, dict]:
    """The single `error:` line (its text after `error: `) and the JSON summary; asserts nothing else on stderr
    looks like usage text or a traceback."""
    cap = capsys.readouterr()
    err = [line for line in cap.err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, cap.err[-3000:]
    assert not any(line.startswith(("usage:", "Traceback")) for line in err), cap.err[-3000:]
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["status"] == "error" and summary["error"] == errors[0][len("error: ") :]
    return errors[0][len("error: ") :], summary


# ------------------------------------------------------------------------------------------------ argparse
HELP = "(`python -m starling_jax.{} --help` lists the flags)"
CONFIG_HELP = "(settings are key=value overrides, e.g. {}; `python -m starling_jax.{} --help` lists the flags)"


@pytest.mark.parametrize(
    "main,argv,message",
    [
        (
            prepare_data.main,
            ["--template", "llama3"],
            "argument --template: invalid choice: 'llama3' (choose from {choices}) " + HELP.format("prepare_data"),
        ),
        (
            aot.main,
            [],
            "the following arguments are required: --topology " + CONFIG_HELP.format("train.micro_batches=8", "aot"),
        ),
        (
            aot.main,
            ["--topology", "v5p-32", "--num-slices", "two"],
            "argument --num-slices: invalid int value: 'two' " + CONFIG_HELP.format("train.micro_batches=8", "aot"),
        ),
        (
            train_rm.main,
            ["--steps=3"],
            "unrecognized arguments: --steps=3 " + CONFIG_HELP.format("train.steps=100 data.batch_size=4", "train_rm"),
        ),
        (
            train_sft.main,
            ["--bogus"],
            "unrecognized arguments: --bogus " + CONFIG_HELP.format("train.steps=100 data.batch_size=8", "train_sft"),
        ),
        (
            train_ppo.main,
            ["--bogus"],
            "unrecognized arguments: --bogus " + CONFIG_HELP.format("algorithm=apa train.steps=20", "train_ppo"),
        ),
        (
            generate.main,
            ["--prompt", "hi", "--data", "x.jsonl"],
            "argument --data: not allowed with argument --prompt " + HELP.format("generate"),
        ),
        (
            score.main,
            ["--batch-size", "many"],
            "argument --batch-size: invalid int value: 'many' " + HELP.format("score"),
        ),
        (export_hf.main, ["--step", "last"], "argument --step: invalid int value: 'last' " + HELP.format("export_hf")),
        (
            convert_starling.main,
            ["--inptu", "x"],
            "unrecognized arguments: --inptu x " + HELP.format("convert_starling"),
        ),
        (
            synthetic.main,
            ["--rows", "x", "out.jsonl"],
            "argument --rows: invalid int value: 'x' " + HELP.format("data.synthetic"),
        ),
        (base_configs.main, ["--chek"], "unrecognized arguments: --chek " + HELP.format("base_configs")),
        (
            verify_hf.main,
            ["--dtype", "float16"],
            "argument --dtype: invalid choice: 'float16' (choose from {choices}) " + HELP.format("verify_hf"),
        ),
    ],
)
def test_argparse_errors_are_one_line_with_a_summary(main, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written or trained, whatever the entry point
    assert main(argv) == 2
    error, summary = one_error(capsys)
    if "{choices}" in message:  # the choices as this Python's argparse quotes them
        head, tail = message.split("{choices}")
        assert error.startswith(head) and error.endswith(tail), error
    else:
        assert error == message
    assert summary.get("error_type", "UsageError") == "UsageError"
    assert list(tmp_path.iterdir()) == []


def test_help_still_prints_help_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--help"])
    assert e.value.code == 0 and "--max-length" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ prepare_data
def test_prepare_data_max_length_is_checked_before_any_row(tmp_path, capsys):
    assert prepare_data.main(["--output", str(tmp_path / "o"), "--max-length", "-1"]) == 2
    error, summary = one_error(capsys)
    assert error == (
        "--max-length -1: must be at least 8 tokens (prompt + answer; train_rm's default is 256, the "
        "7B recipes use 2048)"
    )
    assert summary["error_type"] == "UsageError" and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ empty data
def test_an_empty_data_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for main in (train_rm.main, train_sft.main):
        assert main([f"output_dir={tmp_path / 'run'}", f"data.train={empty}", "train.steps=1"]) == 2
        error, summary = one_error(capsys)
        assert error == f"{empty}: the train split is empty (the file holds no rows)"
        assert summary["error_type"] == "DataError"
    one = tmp_path / "one.jsonl"  # an empty data.eval file: named as the eval split
    one.write_text(bundled_path().read_text().splitlines()[0] + "\n")
    for main in (train_rm.main, train_sft.main):
        assert (
            main(
                [
                    f"output_dir={tmp_path / 'run'}",
                    f"data.train={one}",
                    f"data.eval={empty}",
                    "train.steps=1",
                    "data.batch_size=1",
                ]
            )
            == 2
        )
        assert one_error(capsys)[0] == f"{empty}: the eval split is empty (the file holds no rows)"


def test_an_eval_split_with_no_rows_says_why(tmp_path, capsys):
    one = tmp_path / "one.jsonl"  # one prompt: it hashes into the train split, the eval split holds nothing
    line = next(
        ln for ln in bundled_path().read_text().splitlines() if split_of(json.loads(ln)["prompt"], 0.1) == "train"
    )
    one.write_text(line + "\n")
    assert (
        train_rm.main([f"output_dir={tmp_path / 'run'}", f"data.train={one}", "train.steps=1", "data.batch_size=1"])
        == 2
    )
    error, _ = one_error(capsys)
    assert error == (
        f"{one}: the eval split is empty (none of its 1 rows fell in the eval split held out by prompt "
        "hash (eval_fraction=0.1): use more rows, a larger eval_fraction, or data.eval=FILE)"
    )


# ------------------------------------------------------------------------------------------------ generate, score
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-size", "0"], "--batch-size 0: must be at least 1 (rows per batch)"),
        (["--top-p", "2"], "--top-p 2: must be in (0, 1] (1 = off)"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"),
        (["--temperature", "-0.5"], "--temperature -0.5: must be ≥ 0 (0 = greedy)"),
        (["--top-k", "-3"], "--top-k -3: must be ≥ 0 (0 = off)"),
        (["--stop", ""], "--stop '': an empty stop string would end every row at once"),
    ],
)
def test_generate_checks_its_flags_before_training_or_loading(argv, message, tmp_path, monkeypatch, capsys):
    """In an empty folder (no default policy): the flag is refused at once, nothing is trained."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate, "ensure_default_policy", lambda: pytest.fail("trained the default policy"))
    monkeypatch.setattr("starling_jax.sample.chat.load_policy", lambda *a: pytest.fail("loaded a model"))
    assert generate.main(argv) == 2
    error, summary = one_error(capsys)
    assert error == message and summary["error_type"] == "UsageError"
    assert list(tmp_path.iterdir()) == []


def test_score_checks_data_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("starling_jax.eval.scorer.load_reward_model", lambda *a: pytest.fail("loaded the model first"))
    missing = tmp_path / "missing.jsonl"
    assert score.main(["--model", str(tmp_path), "--data", str(missing)]) == 2
    error, summary = one_error(capsys)
    assert error == f"{missing}: input file not found (and not a Hub dataset name like berkeley-nest/Nectar)"
    assert summary["error_type"] == "DataError"
    assert score.main(["--model", str(tmp_path), "--batch-size", "0"]) == 2
    assert one_error(capsys)[0] == "--batch-size 0: must be at least 1 (sequences per forward pass)"


# ------------------------------------------------------------------------------------------------ convert_starling
def test_brief_never_cuts_a_word():
    words = " ".join(f"word{i}" for i in range(200))
    cut = cli.brief(f"{words}\nsecond line", limit=100)
    assert cut.endswith(" …") and len(cut) <= 102
    assert all(w in words.split() for w in cut[:-2].split())  # every word whole
    assert cli.brief("Cannot find it.  Set   X=1.\n\nTraceback ...") == "Cannot find it. Set X=1."


def test_convert_starling_hub_reason_is_cut_at_a_word(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    reason = "Cannot find an appropriate cached snapshot folder " + "and a much longer explanation " * 20

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(reason + "\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    assert convert_starling.main(["--input", "someone/some-model"]) == 2
    error, _ = one_error(capsys)
    shown = error.split("(LocalEntryNotFoundError: ", 1)[1].split(" …)", 1)[0]
    assert reason.startswith(shown + " ") and error.endswith(" …); download it and pass the folder")


# ------------------------------------------------------------------------------------------------ train_ppo chain
def test_train_ppo_default_chain_child_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """The default reward model is missing and its `train_rm` child fails (its output_dir is a file): one line
    naming the child command, its error and its log, which holds the child's output."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "rm_default").write_text("not a folder")
    assert train_ppo.main([]) == 2
    error, summary = one_error(capsys)
    child = f"output_dir=runs/rm_default: {tmp_path}/runs/rm_default is a file, not a folder; choose another output_dir"
    assert error == (
        "`python -m starling_jax.train_rm`, run to train the missing reward_model=runs/rm_default/hf "
        f"(the default train_rm run), failed with exit code 2: {child}; its output is in "
        "runs/rm_default.log; fix that and run again, or set reward_model=FOLDER_OR_HUB_ID"
    )
    assert f"error: {child}" in (tmp_path / "runs" / "rm_default.log").read_text()
    assert not (tmp_path / "runs" / "ppo_default").exists()


# ------------------------------------------------------------------------------------------------ config.yaml, resume
def test_a_run_failing_in_set_up_keeps_the_previous_config(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("# the previous run's config\n")
    assert train_rm.main([f"output_dir={out}", f"data.train={tmp_path / 'missing.jsonl'}", "train.steps=1"]) == 2
    one_error(capsys)
    assert (out / "config.yaml").read_text() == "# the previous run's config\n"


def fake_run(out, cfg):
    """An output_dir as a run leaves it: its config.yaml and a complete checkpoint folder."""
    (out / "checkpoints" / "4").mkdir(parents=True)
    save_config(cfg, out / "config.yaml")


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    fake_run(out, load_config(RMRunConfig, overrides=[f"output_dir={out}"]))
    assert train_rm.main([f"output_dir={out}", "data.max_length=128", "optim.learning_rate=0.01"]) == 2
    error, summary = one_error(capsys)
    assert error == (
        f"{out / 'config.yaml'}: the run in output_dir={out} would resume with a changed config: "
        "data.max_length (256 → 128), optim.learning_rate (0.001 → 0.01); only train.steps, the "
        "log/eval/save cadence (train.*_every, train.eval_max_batches, train.keep_checkpoints), export.*, "
        "mesh.* and the memory levers (remat_policy, mlp_chunks, attention_impl, attention_block) may "
        "change on resume: revert the changes, or start a new run with another output_dir"
    )
    assert summary["error_type"] == "ConfigError"


def test_resume_may_change_steps_cadence_export_and_mesh(tmp_path):
    out = tmp_path / "run"
    fake_run(out, load_config(RMRunConfig, overrides=[f"output_dir={out}"]))
    same = [
        "train.steps=900",
        "train.log_every=1",
        "train.eval_every=7",
        "train.save_every=3",
        "export.hf=false",
        "train.eval_max_batches=2",
        "mesh.fsdp=2",
        "train.progress_bar=false",
    ]
    # the memory levers, wherever their section is (model.* or a shared runtime.*)
    where = {k.rsplit(".", 1)[-1]: k for k in loop._flat(to_dict(RMRunConfig()))}
    same += [f"{where['remat_policy']}=full", f"{where['mlp_chunks']}=2", f"{where['attention_impl']}=blockwise"]
    loop.check_resume_config(load_config(RMRunConfig, overrides=[f"output_dir={out}", *same]), out)
    changed = load_config(RMRunConfig, overrides=[f"output_dir={out}", "seed=1"])
    with pytest.raises(ConfigError, match=r"seed \(0 → 1\)"):
        loop.check_resume_config(changed, out)
    (out / "checkpoints" / "4").rmdir()  # no complete checkpoint: a fresh start, nothing to compare
    loop.check_resume_config(changed, out)
