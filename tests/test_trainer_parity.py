"""One training step of DPOPlusTrainer equals trl.DPOTrainer: loss, gradient norm and updated weights, in float32.

Exact parity is what `pair_layout="padded"` is for; the default shared-prefix layout is checked against the padded
one in tests/test_layout.py (and against TRL here, to the issue's tolerances, for the loss and gradient norm)."""

import pytest
import torch
import trl
from peft import LoraConfig

from trl_dpo_plus import DPOConfig, DPOTrainer
from conftest import make_pairs

TRL_LOSSES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
EXTRA = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}, "aot": {"label_smoothing": 0.05}}

CASES = [pytest.param({"loss_type": [name], **EXTRA.get(name, {})}, id=name) for name in TRL_LOSSES] + [
    pytest.param({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, id="mpo-weighted"),
    pytest.param({"loss_type": ["sigmoid"], "ld_alpha": 0.5}, id="ld_alpha"),
    pytest.param({"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}, id="f_div-js"),
    pytest.param({"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, id="f_div-alpha"),
    pytest.param({"loss_type": ["sigmoid"], "use_weighting": True}, id="wpo-weighting"),
    pytest.param({"loss_type": ["sigmoid"], "precompute_ref_log_probs": True}, id="precompute"),
]


def run_one_step(trainer_cls, config_cls, model_path, tokenizer, tmp_path, peft, **overrides):
    args = config_cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,  # large enough that a wrong gradient moves the weights visibly
        beta=0.1,
        use_cpu=True,
        bf16=False,
        seed=7,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_drop_last=True,
        **overrides,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0) if peft else None
    trainer = trainer_cls(
        model_path, args=args, train_dataset=make_pairs(8, seed=1), processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    log = trainer.state.log_history[0]
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    return log, weights, trainer


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("overrides", CASES)
def test_one_step_matches_trl(overrides, peft, tiny_models, tokenizer, tmp_path):
    model = tiny_models["llama"]
    theirs, their_weights, _ = run_one_step(trl.DPOTrainer, trl.DPOConfig, model, tokenizer, tmp_path / "trl", peft, **overrides)
    ours, our_weights, trainer = run_one_step(DPOTrainer, DPOConfig, model, tokenizer, tmp_path / "ours", peft,
                                              pair_layout="padded", **overrides)

    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-6)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6, abs=1e-6)
    assert ours["grad_norm"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "entropy", "mean_token_accuracy", "num_tokens"):
        if key.startswith("rewards/") and overrides["loss_type"][0] == "sft":
            continue  # sft alone is reference-free here: its reward is β·mean log-prob, TRL logs β·log-ratio
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert our_weights.keys() == their_weights.keys()
    for name in our_weights:
        torch.testing.assert_close(our_weights[name], their_weights[name], rtol=1e-5, atol=1e-6)


def test_qwen2_matches_trl(tiny_models, tokenizer, tmp_path):
    model = tiny_models["qwen2"]
    theirs, _, _ = run_one_step(trl.DPOTrainer, trl.DPOConfig, model, tokenizer, tmp_path / "trl", False, loss_type=["ipo"])
    ours, _, _ = run_one_step(DPOTrainer, DPOConfig, model, tokenizer, tmp_path / "ours", False, loss_type=["ipo"],
                              pair_layout="padded")
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6)


@pytest.mark.parametrize("overrides", CASES)
def test_default_shared_prefix_layout_matches_trl(overrides, tiny_models, tokenizer, tmp_path):
    """The default layout against TRL itself: loss to 1e-5, gradient norm to 1e-4, the metrics TRL logs to 1e-4."""
    model = tiny_models["llama"]
    theirs, _, _ = run_one_step(trl.DPOTrainer, trl.DPOConfig, model, tokenizer, tmp_path / "trl", False, **overrides)
    ours, _, trainer = run_one_step(DPOTrainer, DPOConfig, model, tokenizer, tmp_path / "ours", False, **overrides)
    assert trainer.layout.name == "shared_prefix"
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4, abs=1e-6)
    for key in ("logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "num_tokens", "logits/chosen"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("ours_set", [{}, {"loss_kwargs": {"exo_pair": {"label_smoothing": 1e-3}}}],
                         ids=["registry-default", "loss_kwargs"])
def test_exo_pair_at_its_registry_epsilon_equals_trl_at_label_smoothing_1e_3(ours_set, tiny_models, tokenizer, tmp_path):
    """TRL refuses exo_pair at label_smoothing=0 (its default); ours runs it at the registry's ε = 1e-3 (the paper's
    recommendation) unless told otherwise, and the step equals TRL's at label_smoothing=1e-3. The config keeps the
    user's label_smoothing."""
    model = tiny_models["llama"]
    theirs, _, _ = run_one_step(trl.DPOTrainer, trl.DPOConfig, model, tokenizer, tmp_path / "trl", False,
                                loss_type=["exo_pair"], label_smoothing=1e-3)
    ours, _, trainer = run_one_step(DPOTrainer, DPOConfig, model, tokenizer, tmp_path / "ours", False,
                                    loss_type=["exo_pair"], pair_layout="padded", **ours_set)
    assert trainer.loss_kwargs[0]["label_smoothing"] == 1e-3 and trainer.args.label_smoothing == 0.0
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-6)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6, abs=1e-6)
