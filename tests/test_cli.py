"""The command line: train from a local dataset or a YAML config, the registry listing, argparse-style errors,
and `run` executing an unchanged TRL script with a registry-only loss."""

import re
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from trl_dpo_plus.cli import main
from conftest import make_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pairs_dir(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    make_pairs(16).to_json(folder / "train.jsonl")
    make_pairs(8, seed=5).to_json(folder / "test.jsonl")
    return folder


def test_losses_lists_the_registry(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"simpo +paired +yes +beta=2.0, gamma=1.0", out)
    assert re.search(r"sigmoid +paired +no +beta=0.1 ", out) and "https://arxiv.org/abs/2305.18290" in out
    assert re.search(r"kto +unpaired +no +beta=0.1, desirable_weight=1.0, undesirable_weight=1.0", out)


def test_train_from_a_local_folder(tiny_models, pairs_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["train", "--model_name_or_path", tiny_models["llama"], "--dataset_name", str(pairs_dir),
                 "--loss_type", "simpo", "--loss_kwargs", '{"simpo": {"gamma": 0.5}}', "--lora", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--output_dir", str(out), "--report_to", "none",
                 "--logging_steps", "1", "--lora_r", "8"])
    assert code == 0
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert "datasets" not in card  # a local folder is not a Hub dataset: named in the body, never as a machine path
    assert card["trl_dpo_plus"]["loss_kwargs"] == {"simpo": {"beta": 2.0, "gamma": 0.5}}
    assert str(tmp_path) not in (out / "README.md").read_text()
    assert card["trl_dpo_plus"]["lora"]["r"] == 8  # the --lora_r flag reached the preset
    assert (out / "adapter_model.safetensors").exists() and (out / "diagnostics.json").exists()


def test_train_from_a_yaml_config(tiny_models, pairs_dir, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "recipe.yaml").write_text(
        f"model_name_or_path: {tiny_models['llama']}\ndataset_name: {pairs_dir / 'train.jsonl'}\nloss_type: [ipo]\n"
        f"beta: 0.5\nmax_steps: 1\nper_device_train_batch_size: 4\noutput_dir: {out}\nreport_to: none\n"
    )
    assert main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 0
    assert ModelCard.load(out / "README.md").data.to_dict()["trl_dpo_plus"]["loss_kwargs"] == {"ipo": {"beta": 0.5}}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--loss_type", "sigmod"], "--loss_type: Unknown loss 'sigmod'. Did you mean 'sigmoid'?"),
        (["--los_type", "simpo"], "unrecognized arguments: --los_type simpo (did you mean --loss_type?)"),
        (["--num_proceses", "2"], "unrecognized arguments: --num_proceses 2 (did you mean --num_processes?)"),
        (["--accelerate_config", "zero9"], "--accelerate_config: Accelerate config zero9 is neither a file"),
        (["--diagnostics_action", "explode"], "invalid choice: 'explode' (choose from 'warn', 'stop', 'checkpoint')"),
        (["--truncation_mode", "middle"], "invalid choice: 'middle' (choose from 'keep_start', 'keep_end', 'keep_completions')"),
        (["--dataset_name", "./missing/pairs.jsonl"], "Dataset path './missing/pairs.jsonl' does not exist"),
        (["--eval_strategy", "steps"], "has no split 'test'; it has ['train']. Set --dataset_test_split or "
                                       "--test_split_size 0.1"),
        (["--dataset_streaming", "true"], "a streamed dataset has no length, so the run needs --max_steps"),
        (["--streaming", "true", "--max_steps", "2", "--test_split_size", "0.2"], "cannot split a streamed one"),
        (["--dataset_name", None, "--qlora"], "pip install 'trl-dpo-plus[qlora]'"),
    ],
)
def test_bad_arguments_give_argparse_messages(args, message, capsys, tmp_path, monkeypatch):
    """Every mistake is a two-line message (the error, and where the options are; exit 2), before any model loads."""
    if "--qlora" in args:  # as on a machine without the [qlora] extra
        import importlib.util
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    (tmp_path / "pairs.jsonl").write_text(make_pairs(4).to_pandas().to_json(orient="records", lines=True))
    args = [str(tmp_path / "pairs.jsonl") if a is None else a for a in args]
    base = ["--model_name_or_path", "trl-dpo-plus:stories260K", "--dataset_name", str(tmp_path / "pairs.jsonl")]
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output_dir", str(tmp_path), *base, *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    (error_line,) = [line for line in err.splitlines() if ": error: " in line]  # one line, then where the options are
    assert message in error_line and "Traceback" not in err and "usage:" not in err
    assert err.rstrip().endswith("(every option: trl-dpo-plus train --help)")


def test_yaml_config_errors_are_argparse_messages(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("model_name_or_path: x\nloss_kwargs: {simpo: {gamma: -1}}\nloss_type: simpo\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "trl-dpo-plus train: error:" in err and "gamma" in err and "Traceback" not in err


def test_the_model_is_required_and_the_embedded_one_is_opt_in(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path)])
    assert "--model_name_or_path is required" in capsys.readouterr().err


def test_dataset_without_the_columns_says_which(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit):
        main(["train", "--model_name_or_path", "trl-dpo-plus:stories260K", "--dataset_name",
              str(tmp_path / "bad.jsonl"), "--output_dir", str(tmp_path)])
    assert "has ['question', 'answer']" in capsys.readouterr().err


def test_version_names_every_package_it_runs_on(capsys):
    from trl_dpo_plus import __version__

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"trl-dpo-plus {__version__} (trl 1.16") and "transformers 5." in out and "torch " in out


def test_losses_piped_into_head_ends_quietly():
    piped = subprocess.run(f"{sys.executable} -m trl_dpo_plus.cli losses | head -1", shell=True, capture_output=True,
                           text=True, timeout=60)
    assert piped.stdout.startswith("loss") and piped.stderr == ""


def test_help_and_losses_do_not_load_torch():
    """`--help` and `losses` answer in well under a second because nothing heavy is imported (torch alone takes
    ~2 s on a small CPU machine); checked by what is imported, not by a clock."""
    code = ("import sys, io, contextlib; from trl_dpo_plus.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help']); main(['losses'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'datasets') if m in sys.modules)\n"
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]" and result.stderr == ""


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "trl_dpo_plus.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_run_executes_an_unchanged_trl_script_with_a_registry_loss(tiny_models, pairs_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", str(ROOT / "examples" / "trl_dpo_script.py"), "--model_name_or_path", tiny_models["llama"],
                     "--dataset_name", str(pairs_dir), "--loss_type", "simpo", "--max_steps", "2",
                     "--per_device_train_batch_size", "4", "--output_dir", str(out), "--report_to", "none",
                     "--use_cpu", "true", "--bf16", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["trl_dpo_plus"]["loss_type"] == ["simpo"]
    assert "none (reference-free loss)" in card.text
    # the same script under plain TRL does not know the loss
    plain = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_dpo_script.py"), "--model_name_or_path",
                            tiny_models["llama"], "--dataset_name", str(pairs_dir), "--loss_type", "simpo",
                            "--max_steps", "1", "--output_dir", str(tmp_path / "plain"), "--report_to", "none",
                            "--use_cpu", "true", "--bf16", "false"], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert plain.returncode != 0 and "simpo" in plain.stderr


def test_run_refuses_missing_and_non_dpo_scripts(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.py"), cwd=tmp_path)
    assert result.returncode == 2 and "no such script" in result.stderr
    (tmp_path / "sft.py").write_text("from trl import SFTTrainer\nprint('hi')\n")
    result = run_cli("run", str(tmp_path / "sft.py"), cwd=tmp_path)
    assert result.returncode == 2 and "does not use TRL's DPOTrainer" in result.stderr
    (tmp_path / "fake.py").write_text("# mentions DPOTrainer but never builds one\nprint('hi')\n")
    result = run_cli("run", str(tmp_path / "fake.py"), cwd=tmp_path)
    assert result.returncode == 3 and "without creating a DPOTrainer" in result.stderr


def test_our_config_and_imports_print_no_upstream_notice():
    """No Transformers FutureWarning from TRL's defaults, no bitsandbytes/DeepSpeed notice on a CPU machine."""
    code = ("import trl_dpo_plus, peft, accelerate; from trl_dpo_plus import DPOConfig; "
            "DPOConfig(output_dir='x', report_to=[]); import deepspeed")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for notice in ("FutureWarning", "gemm_4bit_forward", "Setting accelerator to CPU"):
        assert notice not in run.stderr, run.stderr[-2000:]


def test_a_missing_model_is_one_line_and_debug_shows_the_traceback(pairs_dir, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", str(tmp_path / "nope"), "--dataset_name", str(pairs_dir),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "error: building the trainer: FileNotFoundError: Model path" in err and "--debug" in err
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])


def test_train_help_lists_the_launch_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--accelerate_config NAME|FILE" in out and "--num_processes N" in out


def test_run_takes_the_embedded_model_alias(pairs_dir, tmp_path):
    result = run_cli("run", str(ROOT / "examples" / "trl_dpo_script.py"), "--model_name_or_path",
                     "trl-dpo-plus:stories260K", "--dataset_name", str(pairs_dir), "--max_steps", "1",
                     "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                     "--use_cpu", "true", "--bf16", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "README.md").exists()
