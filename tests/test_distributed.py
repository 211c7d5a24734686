"""Two processes on the CPU (torchrun, gloo): pair statistics and kto_pair's KL baseline cover both ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def launch(model_path, out_path, layout="auto", port=29517, loss="kto_pair", batch_size=3, processes=2):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([torchrun, "--nproc_per_node", str(processes), "--master_port", str(port),
                           str(HERE / "_two_process_run.py"), model_path, str(out_path), str(HERE), layout, loss,
                           str(batch_size)], env=env, capture_output=True, text=True, timeout=600)


def two_process_run(model_path, out_path, layout="auto", port=29517, **kwargs):
    result = launch(model_path, out_path, layout, port, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out_path / f"rank{r}.json").read_text()) for r in range(kwargs.get("processes", 2))]


@pytest.mark.slow
def test_two_processes_share_the_kl_baseline_and_the_statistics(tiny_models, tmp_path):
    ranks = two_process_run(tiny_models["llama"], tmp_path)
    assert ranks[0]["layout"] == ranks[1]["layout"] == "shared_prefix"
    assert ranks[0]["layout_check"]["max_abs_token_logp_error"] <= 1e-5  # gathered over both ranks
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["pairs_logged"] == [6, 6]  # 3 pairs per device × 2 processes reach the diagnostics
    for step in range(2):
        rank0, rank1 = ranks[0]["seen"][step], ranks[1]["seen"][step]
        everyone = rank0["local_dw"] + rank1["local_dw"]
        global_mean = sum(everyone) / len(everyone)
        # both ranks' losses received the same baseline: the mean of Δw over all 6 pairs, not their own 3
        assert rank0["chosen_kl"] == pytest.approx(global_mean, rel=1e-5, abs=1e-6)
        assert rank1["chosen_kl"] == pytest.approx(global_mean, rel=1e-5, abs=1e-6)
    rank0, rank1 = ranks[0]["seen"][1], ranks[1]["seen"][1]  # after one update the ranks' own means differ
    assert sum(rank0["local_dw"]) / 3 != pytest.approx(sum(rank1["local_dw"]) / 3, rel=1e-3)


@pytest.mark.slow
def test_two_processes_train_the_same_in_both_layouts(tiny_models, tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "padded").mkdir()
    shared = two_process_run(tiny_models["llama"], tmp_path / "shared", "shared_prefix", port=29518)
    padded = two_process_run(tiny_models["llama"], tmp_path / "padded", "padded", port=29519)
    assert padded[0]["layout"] == "padded"
    assert shared[0]["losses"] == pytest.approx(padded[0]["losses"], abs=1e-5)
    assert shared[0]["grad_norms"] == pytest.approx(padded[0]["grad_norms"], abs=1e-4)
    assert shared[0]["seen"][1]["chosen_kl"] == pytest.approx(padded[0]["seen"][1]["chosen_kl"], abs=1e-5)


@pytest.mark.slow
def test_token_mean_sft_term_on_two_processes_equals_one_process(tiny_models, tmp_path):
    """A sigmoid + sft mix: 2 processes × 3 pairs train like 1 process × 6 pairs (the sft token mean is global)."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = two_process_run(tiny_models["llama"], tmp_path / "two", port=29520, loss="sigmoid,sft", batch_size=3)
    one = two_process_run(tiny_models["llama"], tmp_path / "one", port=29521, loss="sigmoid,sft", batch_size=6,
                          processes=1)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], abs=1e-5)
    assert two[0]["grad_norms"] == pytest.approx(one[0]["grad_norms"], rel=1e-4)


@pytest.mark.slow
def test_aot_refuses_several_processes_with_a_clear_message(tiny_models, tmp_path):
    result = launch(tiny_models["llama"], tmp_path, port=29522, loss="aot", batch_size=3)
    assert result.returncode != 0
    assert "sort the log-ratios across the batch" in result.stderr and "one process" in result.stderr


@pytest.mark.slow
def test_kto_on_two_processes_matches_trl_kto_and_uses_the_global_baseline(tiny_models, tmp_path):
    """Unpaired KTO, 2 processes × 4 rows: the loss, gradient norm and KL baseline of each step equal
    trl.KTOTrainer's on the same launch, and both ranks' losses received the same baseline: the mean over both ranks'
    mismatched rows, which TRL gathers and logs as `kl` (a rank's own mean would differ from it after one update)."""
    (tmp_path / "ours").mkdir()
    (tmp_path / "trl").mkdir()
    ours = two_process_run(tiny_models["llama"], tmp_path / "ours", "padded", port=29523, loss="kto", batch_size=4)
    theirs = two_process_run(tiny_models["llama"], tmp_path / "trl", port=29524, loss="trl_kto", batch_size=4)
    assert ours[0]["world_size"] == 2
    assert ours[0]["losses"] == pytest.approx(theirs[0]["losses"], rel=1e-6, abs=1e-6)
    assert ours[0]["grad_norms"] == pytest.approx(theirs[0]["grad_norms"], rel=1e-6, abs=1e-6)
    assert ours[0]["kl"] == pytest.approx(theirs[0]["kl"], rel=1e-5, abs=1e-6)
    received = [[step["kl"] for step in rank["seen"]] for rank in ours]
    assert received[0] == pytest.approx(received[1], abs=1e-7)  # one baseline for both ranks
    assert received[0][1] == pytest.approx(theirs[0]["kl"][1], rel=1e-5, abs=1e-6) and received[0][1] > 0
