"""Bad input fails early with a message naming the problem and the fix; good input from Python or the CLI works."""

import logging

import pytest
import trl
from datasets import Dataset
from transformers import HfArgumentParser

from trl_dpo_plus import DPOConfig, DPOTrainer, check_preference_dataset
from conftest import make_pairs


def config(**kw):
    return DPOConfig(output_dir="/tmp/dpo-plus-test", report_to=[], **kw)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"loss_type": "sigmod"}, ValueError, r"Unknown loss 'sigmod'\. Did you mean 'sigmoid'\?"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError, r"1 entries for 2 loss types"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, ValueError, "names a loss twice"),
        ({"loss_type": []}, ValueError, "is empty"),
        ({"loss_type": "simpo", "loss_kwargs": {"simpo": {"gama": 1.0}}}, ValueError, r"Did you mean 'gamma'"),
        ({"loss_type": "simpo", "loss_kwargs": {"simpo": {"gamma": -1.0}}}, ValueError, r"gamma=-1\.0 is out of range"),
        ({"loss_type": "simpo", "loss_kwargs": {"dpop": {"lambda_": 5}}}, ValueError, "not in loss_type"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, r"must lie in \[0, 0\.5\)"),
        ({"loss_type": "sigmoid", "beta": -0.1}, ValueError, r"beta=-0\.1 is out of range"),
        ({"loss_type": "exo_pair", "loss_kwargs": {"exo_pair": {"label_smoothing": 0}}}, ValueError,
         r"label_smoothing=0 is out of range; it must lie in \(0, 1\)"),
        ({"loss_type": "simpo", "f_divergence_type": "js_divergence"}, ValueError, r"not defined for \['simpo'\]"),
        ({"loss_type": "simpo", "sync_ref_model": True}, ValueError, "needs a reference model"),
        ({"loss_type": "simpo", "loss_kwargs": '{"simpo": {gamma: 1}}'}, ValueError, "not valid JSON"),
        ({"loss_type": "aot", "use_weighting": True}, ValueError, "cannot weight 'aot'"),
        ({"diagnostics_action": "explode"}, ValueError, "choose 'warn', 'stop' or 'checkpoint'"),
    ],
)
def test_bad_config_raises_at_construction(kw, error, match):
    with pytest.raises(error, match=match):
        config(**kw)


def test_beta_defaults_to_the_losses_recommendation():
    assert config(loss_type="sigmoid").beta == 0.1
    assert config(loss_type="simpo").beta == 2.0
    assert config(loss_type="ln_dpo").beta == 5.0
    assert config(loss_type="simpo", beta=2.5).loss_kwargs_for("simpo") == {"beta": 2.5, "gamma": 1.0}


def test_shared_trl_fields_reach_the_losses():
    c = config(loss_type=["robust", "discopop"], label_smoothing=0.2, discopop_tau=0.3)
    assert c.loss_kwargs_for("robust") == {"beta": 0.1, "label_smoothing": 0.2}
    assert c.loss_kwargs_for("discopop") == {"beta": 0.1, "tau": 0.3}


def test_cpu_is_selected_without_a_gpu():
    c = config()
    assert c.use_cpu and c.bf16 is False
    with pytest.raises(ValueError, match="use_cpu"):  # what TRL itself does here
        trl.DPOConfig(output_dir="/tmp/x", report_to=[])


def test_command_line_parsing():
    parser = HfArgumentParser(DPOConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--loss_type", "simpo", "cpo", "--loss_weights", "1.0", "0.5",
         "--loss_kwargs", '{"simpo": {"gamma": 0.5}, "cpo": {"alpha": 0.2}}', "--report_to", "none"]
    )
    assert args.loss_type == ["simpo", "cpo"] and args.loss_weights == [1.0, 0.5]
    assert args.loss_kwargs_for("simpo") == {"beta": 2.0, "gamma": 0.5}
    assert args.loss_kwargs_for("cpo") == {"beta": 0.1, "alpha": 0.2}  # β unset: each loss its own recommended β
    with pytest.raises(ValueError, match="Did you mean 'simpo'"):
        parser.parse_args_into_dataclasses(["--output_dir", "/tmp/x", "--loss_type", "simp"])


def test_trl_config_is_accepted_by_our_trainer(tiny_models, tokenizer, tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=1, report_to=[],
                         per_device_train_batch_size=2, beta=0.3)
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(4), processing_class=tokenizer)
    assert isinstance(trainer.args, DPOConfig) and trainer.args.beta == 0.3 and trainer.loss_kwargs == [{"beta": 0.3}]


# -- datasets -------------------------------------------------------------------------------------------------
def test_missing_columns_are_named():
    ds = Dataset.from_list([{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(ValueError, match=r"no 'chosen' or 'rejected' column.*has \['question', 'good', 'bad'\]"):
        check_preference_dataset(ds)


def test_unpaired_data_is_recognised():
    ds = Dataset.from_list([{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(ValueError, match="unpaired"):
        check_preference_dataset(ds)


def test_non_string_field_names_the_row():
    ds = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}])
    with pytest.raises(TypeError, match=r"Row 1, column 'rejected'"):
        check_preference_dataset(ds)


def test_degenerate_pairs_are_counted_and_dropped_on_request(caplog):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": " ", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same "}]
    ds = Dataset.from_list(rows)
    with caplog.at_level(logging.WARNING):
        kept = check_preference_dataset(ds)
    assert len(kept) == 3
    assert "1 of 3 pairs have an empty completion and 1 have chosen == rejected" in caplog.text
    assert len(check_preference_dataset(ds, drop_degenerate=True)) == 1


def test_conversational_pairs_are_accepted():
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                             "chosen": [{"role": "assistant", "content": "hello"}],
                             "rejected": [{"role": "assistant", "content": "go away"}]}])
    assert len(check_preference_dataset(ds)) == 1


def test_trainer_checks_the_dataset_before_loading(tokenizer, tmp_path):
    bad = Dataset.from_list([{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match="no 'chosen' or 'rejected' column"):
        DPOTrainer("/nonexistent/model", args=config(), train_dataset=bad, processing_class=tokenizer)
