"""The reference cache trusts content, not file names: foreign, renamed, damaged or non-finite entries are never read."""

import logging
import os

import pytest
import torch
from datasets import Dataset

from conftest import make_pairs
from trl_dpo_plus import DPOConfig, DPOTrainer
from trl_dpo_plus.reference_cache import Fingerprint, ReferenceCache, cached_precompute

COMPONENTS = {"reference_weights": "w", "tokenizer": "t", "dataset": "d", "truncation": "m", "layout": "l",
              "reduction": "ld_alpha=None"}


def _fingerprint(**changes) -> Fingerprint:
    return Fingerprint({**COMPONENTS, **changes})


def _precompute(dataset: Dataset, values: float = -3.0, calls: list | None = None):
    def compute():
        if calls is not None:
            calls.append(1)
        n = len(dataset)
        return dataset.add_column("ref_chosen_logps", [values] * n).add_column("ref_rejected_logps", [values - 1] * n)
    return compute


def _split(rows: int = 4) -> Dataset:
    return Dataset.from_dict({"prompt_ids": [[1, 2]] * rows})


def test_an_entry_reads_back_only_for_its_own_fingerprint(tmp_path):
    cache, data = ReferenceCache(tmp_path), _split()
    cached_precompute(cache, _fingerprint(), data, "train", _precompute(data))
    calls = []
    again = cached_precompute(cache, _fingerprint(), data, "train", _precompute(data, calls=calls))
    assert calls == [] and again["ref_chosen_logps"] == [-3.0] * 4


def test_a_file_renamed_to_another_fingerprint_is_recomputed_and_replaced(tmp_path, caplog):
    cache, data = ReferenceCache(tmp_path), _split()
    cached_precompute(cache, _fingerprint(reference_weights="other model"), data, "train", _precompute(data, -9.0))
    os.replace(cache.path(_fingerprint(reference_weights="other model")), cache.path(_fingerprint()))
    calls = []
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        fresh = cached_precompute(cache, _fingerprint(), data, "train", _precompute(data, -3.0, calls))
    assert calls == [1] and fresh["ref_chosen_logps"] == [-3.0] * 4
    assert "was computed for another reference_weights" in caplog.text and "recomputing and replacing" in caplog.text
    assert cache.load(_fingerprint(), 4)["chosen"].tolist() == [-3.0] * 4  # replaced


@pytest.mark.parametrize("damage", ["empty", "truncated", "values changed"])
def test_a_damaged_file_is_recomputed_with_one_log_line(tmp_path, caplog, damage):
    cache, data = ReferenceCache(tmp_path), _split()
    cached_precompute(cache, _fingerprint(), data, "train", _precompute(data))
    path = cache.path(_fingerprint())
    raw = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # the last float of the payload changed (the header and its metadata left as written)
        path.write_bytes(raw[:-4] + torch.tensor([-1.0]).numpy().tobytes())
    calls = []
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        cached_precompute(cache, _fingerprint(), data, "train", _precompute(data, calls=calls))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert calls == [1] and len(warnings) == 1 and str(path) in warnings[0].message
    assert ("checksum" in warnings[0].message) == (damage == "values changed")
    assert cache.load(_fingerprint(), 4) is not None  # replaced by a good entry


def test_non_finite_reference_log_probs_are_never_cached(tmp_path):
    cache, data = ReferenceCache(tmp_path), _split()
    with pytest.raises(ValueError, match="hold 8 non-finite values.*reference model.*Nothing was cached"):
        cached_precompute(cache, _fingerprint(), data, "train", _precompute(data, float("nan")))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_folder_fails_before_the_reference_pass(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    calls = []
    with pytest.raises(ValueError, match="reference_cache_dir=.* is not writable.*folder you can write to"):
        cached_precompute(ReferenceCache(blocker / "cache"), _fingerprint(), _split(), "train",
                          _precompute(_split(), calls=calls))
    assert calls == []


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                  save_strategy="no", report_to=[], gradient_checkpointing=False, seed=0, max_length=64, use_cpu=True,
                  reference_cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return DPOConfig(**values)


def _first_step(path, tokenizer, args, data):
    trainer = DPOTrainer(path, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer, next(h for h in trainer.state.log_history if "loss" in h)


def test_another_models_file_under_this_runs_name_trains_from_a_fresh_reference(tiny_models, tokenizer, tmp_path):
    data = make_pairs(4)
    _first_step(tiny_models["llama64"], tokenizer, _args(tmp_path), data)
    (foreign,) = (tmp_path / "cache").glob("ref-logps-*.safetensors")
    DPOTrainer(tiny_models["llama"], args=_args(tmp_path), train_dataset=data, processing_class=tokenizer)
    (own,) = set((tmp_path / "cache").glob("ref-logps-*.safetensors")) - {foreign}
    own.write_bytes(foreign.read_bytes())  # another model's file under this run's name
    _, step = _first_step(tiny_models["llama"], tokenizer, _args(tmp_path), data)
    assert step["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy is its own reference at step 1
    assert step["rewards/margins"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "full"])
def test_max_steps_pays_the_reference_for_the_rows_it_reads(tiny_models, tokenizer, tmp_path, caplog, adapters):
    """With adapters, 2 steps × 4 of 24 pairs: the reference forward runs on those 8 rows as they are read (the
    adapter-disabled base), and the losses are TRL's with its reference precomputed over all 24. Without adapters
    the whole split is precomputed (a per-batch reference would need a second model in memory)."""
    import trl
    from peft import LoraConfig

    data, eval_data = make_pairs(24), make_pairs(6, seed=3)
    common = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[],
                  gradient_checkpointing=False, seed=0, max_length=64, use_cpu=True, bf16=False, learning_rate=1e-3,
                  eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=6)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0) if adapters else None
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        ours = DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path / "ours"), **common,
                                                               reference_cache_dir=str(tmp_path / "cache")),
                          train_dataset=data, eval_dataset=eval_data, processing_class=tokenizer, peft_config=peft_config)
    assert "ref_chosen_logps" in ours.eval_dataset.column_names  # the eval split is read whole: precomputed
    if not adapters:
        assert "ref_chosen_logps" in ours.train_dataset.column_names and "without adapters" in caplog.text
        return
    assert "ref_chosen_logps" not in ours.train_dataset.column_names and "reads 8 of the 24 train rows" in caplog.text
    ours.train()
    assert ours.reference_forwards["rows"] == 6 + 8  # the eval split once, then the 8 train rows read
    theirs = trl.DPOTrainer(tiny_models["llama"], args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), **common,
                                                                     precompute_ref_log_probs=True),
                            train_dataset=data, eval_dataset=eval_data, processing_class=tokenizer,
                            peft_config=peft_config)
    theirs.train()
    for key in ("loss", "rewards/margins", "eval_loss"):
        mine = [h[key] for h in ours.state.log_history if key in h]
        trl_values = [h[key] for h in theirs.state.log_history if key in h]
        assert mine == pytest.approx(trl_values, abs=1e-5) and len(mine) >= 1, key
    from trl_dpo_plus.hub import reference_mode

    assert "computed per batch on the 8 train rows" in reference_mode(ours)  # what the model card says


def test_ld_alpha_is_part_of_the_fingerprint(tiny_models, tokenizer, tmp_path):
    data = make_pairs(4)
    weighted, _ = _first_step(tiny_models["llama"], tokenizer, _args(tmp_path, ld_alpha=0.5), data)
    plain, step = _first_step(tiny_models["llama"], tokenizer, _args(tmp_path), data)
    assert plain.reference_forwards["rows"] == 4  # not read from the ld_alpha=0.5 entry
    assert step["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 2
