"""Multi-slice RL: train_ppo on a two-slice mesh (`mesh.dcn=2` over the 8 simulated CPU devices, as
tests/model/test_multislice.py): its data-parallel size counts the slices (dcn × data × fsdp), the minibatch
refusal uses it, and an iteration (rollouts, scores, experience, update, held-out eval) runs on it."""

import json

import jax
import pytest

from starling_jax import train_ppo
from starling_jax.parallel import sharding
from tests.rl.fixtures import ppo_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return ppo_folders(tmp_path_factory.mktemp("ppo_dcn"), layers=1)


def args_for(folders, out, *extra):
    policy, rm, prompts = folders
    return [
        f"policy={policy}",
        f"reward_model={rm}",
        f"prompts.train={prompts}",
        f"output_dir={out}",
        "critic_init=policy",
        "rollout.batch_size=8",
        "rollout.max_new_tokens=4",
        "prompts.max_prompt_tokens=32",
        "train.progress_bar=false",
        "export.plot=false",
        "mesh.dcn=2",
        *extra,
    ]


def last_json(capsys) -> tuple[dict, str]:
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_two_slice_mesh_data_parallel_size():
    mesh = sharding.make_mesh(sharding.MeshConfig(dcn=2, fsdp=-1, tensor=1))
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
    assert sharding.data_parallel_size(mesh) == 8  # data × fsdp alone would say 4


def test_minibatch_refusal_counts_the_slices(folders, tmp_path, capsys):
    """A minibatch of 4 splits over one slice's 4 fsdp devices but not over the 8 data-parallel devices of two."""
    rc = train_ppo.main(args_for(folders, tmp_path / "out", "rollout.minibatch_size=4", "prompts.eval_prompts=8"))
    summary, err = last_json(capsys)
    assert rc == 2 and summary["status"] == "error"
    assert err.strip().splitlines()[-1] == (
        "error: rollout.minibatch_size=4 is not a multiple of the mesh's 8 data-parallel devices "
        "(mesh.dcn=2 × mesh.data=1 × mesh.fsdp=4)"
    )


@pytest.mark.slow
def test_ppo_iteration_runs_on_two_slices(folders, tmp_path, capsys):
    """(dcn 2, fsdp 2, tensor 2): 4 data-parallel devices. 6 held-out prompts are padded to 8 rows for the
    evaluation rollouts and scores (with data × fsdp = 2 they would be 6 rows, which do not split over the batch
    axes (dcn, fsdp) of the mesh); one iteration trains and evaluates."""
    assert jax.device_count() == 8
    rc = train_ppo.main(
        args_for(
            folders,
            tmp_path / "out",
            "mesh.tensor=2",
            "rollout.minibatch_size=4",
            "prompts.eval_prompts=6",
            "train.steps=1",
            "export.hf=false",
        )
    )
    summary, err = last_json(capsys)
    assert rc == 0 and summary["status"] == "completed" and summary["steps"] == 1, err[-3000:]
    assert summary["reward_start"] is not None and summary["reward_end"] is not None
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and abs(row["loss"]) < 1e6 and "rollout/kl" in row
