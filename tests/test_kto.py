"""Unpaired KTO data (prompt, completion, label) in DPOPlusTrainer: one step equals trl.KTOTrainer's, the data checks,
and the paired <-> unpaired helper."""

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig

from trl_dpo_plus import DPOConfig, DPOTrainer, unpair_preference_dataset
from conftest import make_pairs


def make_unpaired(n: int, seed: int = 0, desirable_share: float = 0.5) -> Dataset:
    """Unpaired rows: each generated pair's chosen (desirable) or rejected (undesirable) completion, not both."""
    import random

    rng = random.Random(seed)
    rows = []
    for row in make_pairs(n, seed=seed):
        good = rng.random() < desirable_share
        rows.append({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"], "label": good})
    return Dataset.from_list(rows)


def run_one_step(trainer_cls, config_cls, model_path, tokenizer, tmp_path, peft, dataset=None, **overrides):
    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, beta=0.1,
        use_cpu=True, bf16=False, seed=7, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_drop_last=True, **overrides,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0) if peft else None
    trainer = trainer_cls(model_path, args=args, train_dataset=dataset or make_unpaired(8, seed=1),
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return trainer.state.log_history[:2], trainer


# apo_zero_unpaired has no KL term, so our default order is random; TRL's KTOConfig reads in order for every loss
SEQUENTIAL = {"train_sampling_strategy": "sequential"}
CASES = [
    pytest.param({"loss_type": "kto"}, id="kto"),
    pytest.param({"loss_type": "apo_zero_unpaired", **SEQUENTIAL}, id="apo_zero_unpaired"),
    pytest.param({"loss_type": "kto", "desirable_weight": 1.3, "undesirable_weight": 0.7}, id="kto-weights"),
    pytest.param({"loss_type": "kto", "precompute_ref_log_probs": True}, id="kto-precompute"),
    pytest.param({"loss_type": "apo_zero_unpaired", "precompute_ref_log_probs": True, **SEQUENTIAL}, id="apo-precompute"),
]


@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("overrides", CASES)
def test_one_step_matches_trl_kto(overrides, peft, layout, tiny_models, tokenizer, tmp_path):
    model = tiny_models["llama"]
    theirs, _ = run_one_step(trl.KTOTrainer, trl.KTOConfig, model, tokenizer, tmp_path / "trl", peft, **overrides)
    ours, trainer = run_one_step(DPOTrainer, DPOConfig, model, tokenizer, tmp_path / "ours", peft, pair_layout=layout,
                                 **overrides)
    assert trainer.layout.name == layout
    # Step 1 starts at the reference (every loss 0.5); step 2, after an update, has real log-ratios and KL baseline
    assert theirs[1]["loss"] != pytest.approx(0.5, abs=1e-4)
    # The padded layout is TRL's own arithmetic; the shared-prefix one sums the same terms in another order (the
    # tolerances of the paired shared-prefix tests in test_trainer_parity.py)
    tol = 1e-6 if layout == "padded" else 1e-5
    for step, (mine, trl_log) in enumerate(zip(ours, theirs, strict=True)):
        assert mine["loss"] == pytest.approx(trl_log["loss"], rel=tol, abs=tol), step
        assert mine["grad_norm"] == pytest.approx(trl_log["grad_norm"], rel=10 * tol, abs=tol), step
        assert mine["grad_norm"] > 0
        keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "entropy", "num_tokens"]
        for key in keys + (["kl"] if overrides["loss_type"] == "kto" else []):
            assert mine[key] == pytest.approx(trl_log[key], rel=1e-5, abs=10 * tol), (step, key)
