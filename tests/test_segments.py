"""The segment attention (`trl_dpo_plus.layout.segments`): the shared-prefix mask's pattern computed segment by
segment, no `L × L` tensor; its varlen indices (what the CUDA kernel reads); the padding-free `packed` layout."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from trl_dpo_plus import DPOConfig, DPOTrainer
from trl_dpo_plus.layout import SegmentPlan, SharedPrefixCollator, shared_prefix_mask
from trl_dpo_plus.layout.segments import loop_attention, varlen_attention
from conftest import make_pairs

EXAMPLES = [
    {"prompt_ids": [1, 2, 3, 4, 5, 6], "chosen_ids": [5, 6], "rejected_ids": [7, 8, 9]},
    {"prompt_ids": [8, 9], "chosen_ids": [10], "rejected_ids": [11, 12, 13, 14, 15]},
    {"prompt_ids": [], "chosen_ids": [16, 17, 18], "rejected_ids": [19, 20]},  # empty prompt: nothing shared
    {"prompt_ids": [21, 22, 23, 24, 25, 26, 27, 28, 29], "chosen_ids": [22, 23, 24, 25], "rejected_ids": [28]},
]


def qkv(batch, heads=4, kv_heads=2, dim=8, seed=0):
    torch.manual_seed(seed)
    rows, width = batch["input_ids"].shape
    q = torch.randn(rows, heads, width, dim, dtype=torch.float64)
    k, v = (torch.randn(rows, kv_heads, width, dim, dtype=torch.float64) for _ in range(2))
    return q, k, v


def dense_reference(batch, q, k, v, window=None):
    """SDPA under the dense shared-prefix mask (the path the segments replace), with a sliding window on the
    sequence positions when given."""
    mask = shared_prefix_mask(batch["pair_ids"], batch["branch_ids"], "sdpa", q.dtype)
    if window is not None:
        pos = batch["position_ids"]
        mask = mask & (pos[:, None, :, None] - pos[:, None, None, :] < window)
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("packing_length", [None, 0, 20])
def test_segments_and_their_varlen_indices_equal_the_dense_mask(packing_length, window):
    batch = SharedPrefixCollator(pad_token_id=0, packing_length=packing_length)(EXAMPLES)
    plan = SegmentPlan.from_batch(batch)
    q, k, v = qkv(batch)
    real = batch["pair_ids"] >= 0
    theirs = dense_reference(batch, q, k, v, window)[real]
    for kernel, tolerance in (("sdpa", 1e-10), ("eager", 1e-6)):  # eager's softmax is float32, as Transformers'
        ours = loop_attention(plan, q, k, v, kernel=kernel, window=window)
        torch.testing.assert_close(ours[real], theirs, rtol=tolerance, atol=tolerance)
        assert ours[~real].abs().max() == 0 if (~real).any() else True
    # the flat indices and cumulative lengths the CUDA varlen kernel reads, through its CPU reference
    torch.testing.assert_close(varlen_attention(plan, q, k, v, window=window)[real], theirs, rtol=1e-10, atol=1e-10)
    assert plan.cu_q[-1] == real.sum() and plan.cu_k[-1] == plan.k_index.numel()


def test_the_whole_batch_is_one_row_with_segments_and_rows_stop_at_the_budget_with_a_dense_mask():
    one_row = SharedPrefixCollator(pad_token_id=0)(EXAMPLES)
    assert one_row["input_ids"].shape[0] == 1 and bool((one_row["pair_ids"] >= 0).all())  # no padding at all
    budgeted = SharedPrefixCollator(pad_token_id=0, packing_length=16)(EXAMPLES)
    assert budgeted["input_ids"].shape[0] > 1


def tiny_llama(tmp_path, tokenizer, **extra):
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def trainer(model, tokenizer, tmp_path, **config):
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1, report_to=[],
                     save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0, **config)
    return DPOTrainer(model, args=args, train_dataset=make_pairs(8, seed=3), processing_class=tokenizer)


class Shapes(TorchDispatchMode):
    """Every tensor shape an operator returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("attention", ["segments", "dense_mask"])
def test_no_l_by_l_tensor_is_built_on_the_segment_path(attention, tokenizer, tmp_path):
    """A whole training step (policy forward, reference forward, backward) on a one-row batch of width L: with the
    segment attention no operator returns a tensor with an `L × L` part; with the dense mask some do (so the check
    can fail)."""
    run = trainer(tiny_llama(tmp_path, tokenizer), tokenizer, tmp_path, shared_prefix_attention=attention,
                  packing_length=4096)  # one row either way
    batch = run._prepare_inputs(next(iter(run.get_train_dataloader())))
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape[0] == 1 and width > 64
    run.model.train()
    with Shapes() as seen:
        run.compute_loss(run.model, batch).backward()
    square = [s for s in seen.shapes if len(s) >= 2 and s[-1] == width and s[-2] == width]
    assert (not square) if attention == "segments" else square, square[:3]


def test_packed_layout_trains_the_step_of_the_padded_layout(tiny_models, tokenizer, tmp_path):
    """The padding-free layout without sharing: each pair's two whole sequences in one row; the same step as TRL's
    padded layout, for a paired and for a KL-baseline loss."""
    for loss in ("sigmoid", "kto_pair"):
        packed = trainer(tiny_models["llama"], tokenizer, tmp_path / loss / "packed", pair_layout="packed",
                         loss_type=loss)
        padded = trainer(tiny_models["llama"], tokenizer, tmp_path / loss / "padded", pair_layout="padded",
                         loss_type=loss)
        assert packed.layout.name == "packed" and packed.layout.attention == "segments"
        batch = next(iter(packed.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 1 and int((batch["branch_ids"] == 0).sum()) == 0  # nothing shared
        packed.train()
        padded.train()
        ours, theirs = packed.state.log_history[0], padded.state.log_history[0]
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4, abs=1e-6)


def test_a_moe_model_with_a_load_balancing_loss_trains_packed_with_the_padded_aux_loss(tokenizer, tmp_path, caplog):
    """Sharing the prompt would count its tokens once in the MoE load-balancing loss; packing without sharing counts
    every token of both sequences, as TRL's padded batch does, so `auto` picks `packed` and the step (aux loss
    included) equals the padded one."""
    config = AutoConfig.for_model("mixtral", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        auto = trainer(str(tmp_path / "moe"), tokenizer, tmp_path / "auto")
    assert auto.layout.name == "packed" and "MoE" in auto.layout_reason and "Pair layout: packed" in caplog.text
    padded = trainer(str(tmp_path / "moe"), tokenizer, tmp_path / "padded", pair_layout="padded")
    auto.train()
    padded.train()
    ours, theirs = auto.state.log_history[0], padded.state.log_history[0]
    assert ours["aux_loss"] == pytest.approx(theirs["aux_loss"], abs=1e-5) and ours["aux_loss"] > 0
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    with pytest.raises(ValueError, match="MoE load-balancing"):
        trainer(str(tmp_path / "moe"), tokenizer, tmp_path / "forced", pair_layout="shared_prefix")
