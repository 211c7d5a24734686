"""The shared-prefix layout: the same sequences as TRL's collator, the same log-probs as the padded forward, the same
training step for every registered loss, and a fallback (with its reason) where it cannot be exact."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_dpo_plus import DPOConfig, DPOTrainer, list_losses
from trl_dpo_plus.layout import (
    PaddedPairLayout,
    SharedPrefixCollator,
    padded_tokens,
    plan_rows,
    shared_prefix_mask,
    truncate_pair,
    unpack_to_padded,
)
from trl_dpo_plus.losses import get_loss
from conftest import make_pairs

EXAMPLES = [
    {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6], "rejected_ids": [7]},
    {"prompt_ids": [8, 9], "chosen_ids": [10], "rejected_ids": [11, 12, 13, 14, 15]},
    {"prompt_ids": [], "chosen_ids": [16, 17, 18], "rejected_ids": [19, 20]},  # empty prompt
    {"prompt_ids": [21], "chosen_ids": [22, 23, 24, 25, 26, 27], "rejected_ids": [28]},
]


def trim(batch):
    """A padded batch without its all-padding columns, so that two collators' outputs compare."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: batch[k][:, :width] for k in ("input_ids", "attention_mask", "completion_mask")}


@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (6, "keep_start"), (5, "keep_end"), (4, "keep_end")])
@pytest.mark.parametrize("packing_length", [0, 8, 1024])
def test_unpacked_batch_is_exactly_trls_padded_batch(max_length, mode, packing_length):
    """Each pair's two sequences, rebuilt from the packed rows, are the rows TRL's own collator builds."""
    packed = SharedPrefixCollator(pad_token_id=0, max_length=max_length, truncation_mode=mode,
                                  packing_length=packing_length)(EXAMPLES)
    theirs = trim(DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(EXAMPLES))
    ours = trim(unpack_to_padded(packed, pad_token_id=0))
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # scored tokens: one per completion token that has a token before it in its own sequence (TRL's shifted mask)
    assert packed["gather_index"].numel() == int(theirs["completion_mask"][:, 1:].sum())
    # TRL's num_tokens counts the prompt once per completion
    assert int(packed["num_tokens"]) == int(theirs["attention_mask"].sum())


def test_prompt_is_computed_once_and_rows_respect_the_budget():
    packed = SharedPrefixCollator(pad_token_id=0, packing_length=12)(EXAMPLES)
    real = (packed["pair_ids"] >= 0).sum(dim=1)
    assert (real <= 12).all()
    # 4 + 2 + 1 + 1 (the repeated last prompt token) ... : prompt once, each completion once, one extra token per pair
    expected = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) + (1 if e["prompt_ids"] else 0)
                   for e in EXAMPLES)
    assert int(real.sum()) == expected
    # the rejected branch restarts its positions where the prompt ends
    row, cols = torch.nonzero(packed["pair_ids"] == 0, as_tuple=True)
    assert packed["position_ids"][row, cols].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]


def test_plan_rows_keeps_every_pair_once_in_batch_order_within_rows():
    lengths = [7, 3, 9, 2, 5, 20, 1]
    rows = plan_rows(lengths, budget=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(row == sorted(row) for row in rows)
    assert all(sum(lengths[i] for i in row) <= 10 or len(row) == 1 for row in rows)


def test_mask_rejected_never_sees_chosen_and_pairs_never_see_each_other():
    packed = SharedPrefixCollator(pad_token_id=0, packing_length=1024)(EXAMPLES[:2])
    mask = shared_prefix_mask(packed["pair_ids"], packed["branch_ids"], "sdpa", torch.float32)[0, 0]
    pair, branch = packed["pair_ids"][0], packed["branch_ids"][0]
    for q in range(mask.size(0)):
        for k in range(mask.size(1)):
            if pair[q] < 0 or q == k:
                continue
            allowed = pair[q] == pair[k] and k < q and (branch[k] == 0 or branch[k] == branch[q])
            assert bool(mask[q, k]) == bool(allowed), (q, k)
    additive = shared_prefix_mask(packed["pair_ids"], packed["branch_ids"], "eager", torch.float32)
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, mask.unsqueeze(0).unsqueeze(0))


def test_keep_completions_keeps_one_prompt_for_both_sides():
    shared, chosen, start, rejected, _ = truncate_pair(list(range(10)), [20, 21, 22], [30], 6, "keep_completions")
    assert shared + chosen[:start] == [7, 8, 9] and chosen[start:] == [20, 21, 22] and rejected[start:] == [30]
    # completions longer than max_length: the prompt keeps its last token, the completions are cut at the end
    shared, chosen, start, rejected, _ = truncate_pair([1, 2, 3], list(range(10, 20)), [5], 4, "keep_completions")
    assert shared + chosen[:start] == [3] and chosen[start:] == [10, 11, 12] and rejected[start:] == [5]


# -- the forward: the same log-probs as the padded layout, per architecture and attention implementation ----------
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma": {"head_dim": 8},
    "gpt_neox": {},
    "mistral": {"sliding_window": None},
}


def tiny_model(tmp_path, tokenizer, family, attn, **extra):
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **{**FAMILIES.get(family, {}), **extra},
    )
    torch.manual_seed(0)
    path = tmp_path / f"{family}-{attn}"
    AutoModelForCausalLM.from_config(config, attn_implementation=attn).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def trainer_for(model_path, tokenizer, tmp_path, n=8, **config):
    config = {"per_device_train_batch_size": 8, "max_steps": 1, "report_to": [], "save_strategy": "no",
              "logging_steps": 1, "packing_length": 96, "seed": 0, **config}
    peft_config = config.pop("peft_config", None)
    args = DPOConfig(output_dir=str(tmp_path / "out"), **config)
    return DPOTrainer(model_path, args=args, train_dataset=make_pairs(n, seed=3), processing_class=tokenizer,
                      peft_config=peft_config)


def token_error(trainer):
    """Max |per-token log-prob difference| between the shared-prefix and the padded forward of one batch."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["input_ids"].size(0) < 2 * 8  # pairs were packed: fewer rows than TRL's 2B
    with torch.no_grad():
        shared = trainer.layout.policy_forward(trainer.forward_context, trainer.model, batch)
        padded = PaddedPairLayout().policy_forward(trainer.forward_context, trainer.model,
                                                   unpack_to_padded(batch, trainer.pad_token_id))
    theirs = padded_tokens(padded)
    width = theirs.size(1)
    assert torch.equal(shared.mask[:, :width].bool(), (theirs != 0) | shared.mask[:, :width].bool())
    assert torch.equal(shared.lengths, padded.lengths)
    return ((shared.per_token_logps[:, :width] - theirs) * shared.mask[:, :width]).abs().max().item()


@pytest.mark.parametrize("attention", ["segments", "dense_mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_token_logps_equal_the_padded_forward(family, attn, attention, tokenizer, tmp_path):
    """Both attention paths of the shared-prefix layout; the segment attention is the default ('auto')."""
    trainer = trainer_for(tiny_model(tmp_path, tokenizer, family, attn), tokenizer, tmp_path,
                          model_init_kwargs={"attn_implementation": attn},
                          **({} if attention == "segments" else {"shared_prefix_attention": attention}))
    expected = f"dpo_plus_{attn}" if attention == "segments" else attn  # the segment path wraps the original
    assert trainer.model.config._attn_implementation == expected
    assert trainer.layout.name == "shared_prefix" and trainer.layout.attention == attention
    assert token_error(trainer) <= 1e-5


def test_eager_attention_needs_an_additive_mask(tokenizer, tmp_path, monkeypatch):
    """A bool mask is silently wrong under eager attention (it is added to the scores): the layout builds a float one."""
    import trl_dpo_plus.layout.shared_prefix as layout

    trainer = trainer_for(tiny_model(tmp_path, tokenizer, "llama", "eager"), tokenizer, tmp_path,
                          model_init_kwargs={"attn_implementation": "eager"}, shared_prefix_attention="dense_mask")
    assert trainer.model.config._attn_implementation == "eager"
    assert token_error(trainer) <= 1e-5
    monkeypatch.setattr(layout, "shared_prefix_mask", lambda p, b, attn, dtype: shared_prefix_mask(p, b, "sdpa", dtype))
    assert token_error(trainer) > 1e-2


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_adapters_policy_and_reference_equal_the_padded_forward(adapter, tiny_models, tokenizer, tmp_path):
    config = {"lora": True} if adapter == "lora" else {"qlora": True}
    model = tiny_models["llama64"]
    trainer = trainer_for(model, tokenizer, tmp_path, **config)
    assert trainer.layout.name == "shared_prefix"
    tolerance = 1e-5 if adapter == "lora" else 5e-2  # QLoRA computes in bf16: both layouts round differently
    assert token_error(trainer) <= tolerance
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ours = torch.stack(trainer.compute_ref_log_probs(trainer.model, batch))
    theirs = torch.stack(trainer.forward_context.padded_reference(trainer.model,
                                                                  unpack_to_padded(batch, trainer.pad_token_id)))
    per_token = (ours - theirs).abs() / torch.stack(trainer.layout.policy_forward(
        trainer.forward_context, trainer.model, batch).lengths.chunk(2)).clamp(min=1)
    assert per_token.max() <= tolerance


# -- one training step of every registered loss equals the padded layout's -------------------------------------
LOSS_EXTRA = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


def one_step(model_path, tokenizer, tmp_path, layout, loss):
    trainer = trainer_for(model_path, tokenizer, tmp_path / layout, pair_layout=layout, loss_type=loss,
                          learning_rate=1e-3, **LOSS_EXTRA.get(loss, {}))
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("loss", [n for n in list_losses() if get_loss(n).data == "paired"])  # unpaired: test_kto.py
def test_every_loss_trains_the_same_step_in_both_layouts(loss, tiny_models, tokenizer, tmp_path):
    padded = one_step(tiny_models["llama"], tokenizer, tmp_path, "padded", loss)
    shared = one_step(tiny_models["llama"], tokenizer, tmp_path, "shared_prefix", loss)
    assert shared["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    assert shared["grad_norm"] == pytest.approx(padded["grad_norm"], abs=1e-4)
    assert padded["grad_norm"] > 0 or get_loss(loss).name == "aot"
    if get_loss(loss).requires_reference:
        assert shared["rewards/margins"] == pytest.approx(padded["rewards/margins"], abs=1e-5)


# -- where it cannot be exact: the padded layout, and the reason ---------------------------------------------------
def test_sliding_window_is_exact_with_segments_and_falls_back_with_a_dense_mask(tokenizer, tmp_path, caplog):
    """A window of 8 tokens bites inside these ~30-token sequences: the segment attention applies it per segment
    (equal to the padded forward, which applies the model's own sliding-window mask); the dense mask cannot, so
    there the run falls back to the padded layout and says why."""
    model = tiny_model(tmp_path, tokenizer, "mistral", "sdpa", sliding_window=8)
    trainer = trainer_for(model, tokenizer, tmp_path, max_length=64)
    assert trainer.layout.name == "shared_prefix" and trainer.layout.attention == "segments"
    assert token_error(trainer) <= 1e-5
    # and the window really bites on these pairs: the same weights without it give other log-probs
    windowless = trainer_for(model, tokenizer, tmp_path, max_length=64, model_init_kwargs={"sliding_window": None})
    assert windowless.model.config.sliding_window is None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        with_window, without = (t.layout.policy_forward(t.forward_context, t.model, batch).logps
                                for t in (trainer, windowless))
    assert (with_window - without).abs().max() > 1e-3
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        dense = trainer_for(model, tokenizer, tmp_path, max_length=64, shared_prefix_attention="dense_mask")
    assert dense.layout.name == "padded" and "sliding-window" in dense.layout_reason
    assert "Pair layout: padded" in caplog.text
    # a window no shorter than max_length never bites: the dense mask is exact there
    wide = tiny_model(tmp_path / "wide", tokenizer, "mistral", "sdpa", sliding_window=64)
    assert trainer_for(wide, tokenizer, tmp_path, max_length=64, shared_prefix_attention="dense_mask").layout.name == \
        "shared_prefix"
    with pytest.raises(ValueError, match="sliding-window"):
        trainer_for(model, tokenizer, tmp_path, max_length=64, pair_layout="shared_prefix",
                    shared_prefix_attention="dense_mask")


def test_flex_attention_trains_through_the_segment_path(tiny_models, tokenizer, tmp_path):
    """flex_attention takes no custom 4D mask and has no backward on the CPU; the segment attention serves it (with
    the sdpa kernel), exactly, and trains. With the dense mask only, it falls back to the padded layout."""
    trainer = trainer_for(tiny_models["llama"], tokenizer, tmp_path,
                          model_init_kwargs={"attn_implementation": "flex_attention"})
    assert trainer.layout.name == "shared_prefix" and trainer.layout.attention == "segments"
    assert trainer.model.config._attn_implementation == "dpo_plus_flex_attention"
    assert token_error(trainer) <= 1e-5
    trainer.train()
    assert trainer.state.log_history[0]["grad_norm"] > 0
    dense = trainer_for(tiny_models["llama"], tokenizer, tmp_path / "dense", shared_prefix_attention="dense_mask",
                        model_init_kwargs={"attn_implementation": "flex_attention"})
    assert dense.layout.name == "padded" and "flex_attention" in dense.layout_reason


def test_an_attention_the_segment_path_cannot_serve_falls_back(tiny_models, tokenizer, tmp_path):
    """A user-registered attention implementation has no segment kernel and takes no known mask: padded, with why;
    asking for segments explicitly fails when the trainer is built."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("my_attention", sdpa_attention_forward)
    AttentionMaskInterface.register("my_attention", sdpa_mask)
    trainer = trainer_for(tiny_models["llama"], tokenizer, tmp_path,
                          model_init_kwargs={"attn_implementation": "my_attention"})
    assert trainer.layout.name == "padded" and "my_attention" in trainer.layout_reason
    with pytest.raises(ValueError, match="shared_prefix_attention='segments' cannot serve"):
        trainer_for(tiny_models["llama"], tokenizer, tmp_path, shared_prefix_attention="segments",
                    model_init_kwargs={"attn_implementation": "my_attention"})


def test_a_model_that_builds_its_own_mask_is_caught_on_the_first_batch(tokenizer, tmp_path, caplog):
    """Bloom builds ALiBi from a 2D mask: the first-batch check sees it, the run goes on padded, and says why."""
    config = AutoConfig.for_model("bloom", vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path / "bloom"
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(path)
    tokenizer.save_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        trainer = trainer_for(str(path), tokenizer, tmp_path, max_steps=2, model_init_kwargs={"attn_implementation": "eager"})
        trainer.train()
    assert trainer.layout.name == "padded" and "4D attention mask" in trainer.layout_reason
    assert "falling back to padded" in caplog.text
    reference = trainer_for(str(path), tokenizer, tmp_path / "padded", max_steps=2, pair_layout="padded")
    reference.train()
    assert trainer.state.log_history[1]["loss"] == pytest.approx(reference.state.log_history[1]["loss"], abs=1e-6)
    with pytest.raises(RuntimeError, match="not exact for this model"):
        trainer_for(str(path), tokenizer, tmp_path / "explicit", pair_layout="shared_prefix").train()


def test_the_model_card_records_the_layout(tiny_models, tokenizer, tmp_path):
    trainer = trainer_for(tiny_models["llama"], tokenizer, tmp_path)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pair_layout: shared_prefix" in card


# -- truncation: counted, and a mode that keeps the pair's prompt identical ---------------------------------------
def long_prompt_pairs(n=8):
    data = make_pairs(n, seed=5)
    return data.map(lambda row, i: {"prompt": " ".join(["Once upon a time there was a big dog."] * (1 + i % 4))
                                    + " " + row["prompt"]}, with_indices=True)


def test_truncated_and_dropped_pairs_are_counted(tiny_models, tokenizer, tmp_path, caplog):
    args = DPOConfig(output_dir=str(tmp_path), max_length=48, report_to=[], per_device_train_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=long_prompt_pairs(), processing_class=tokenizer)
    counts = trainer.truncation_counts["train"]
    prompts = [len(tokenizer(p)["input_ids"]) for p in long_prompt_pairs()["prompt"]]
    assert counts["dropped"] == sum(p >= 48 for p in prompts) > 0
    assert counts["pairs"] == 8 - counts["dropped"] and counts["truncated"] > 0
    kept = trainer.train_dataset
    assert counts["truncated"] == sum(len(p) + max(len(c), len(r)) > 48 for p, c, r in
                                      zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"]))
    assert f"{counts['dropped']} of 8 pairs dropped" in caplog.text and "keep_completions" in caplog.text


@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
def test_keep_completions_keeps_every_pair_and_both_layouts_agree(layout, tiny_models, tokenizer, tmp_path):
    def run(pair_layout):
        args = DPOConfig(output_dir=str(tmp_path / pair_layout), max_length=48, truncation_mode="keep_completions",
                         report_to=[], per_device_train_batch_size=8, max_steps=1, logging_steps=1, save_strategy="no",
                         pair_layout=pair_layout)
        trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=long_prompt_pairs(),
                             processing_class=tokenizer)
        trainer.train()
        return trainer

    trainer = run(layout)
    assert trainer.truncation_counts["train"]["dropped"] == 0 and trainer.truncation_counts["train"]["pairs"] == 8
    batch = next(iter(trainer.get_train_dataloader()))
    if layout == "padded":
        lengths = batch["attention_mask"].sum(dim=1)
        prompts = (batch["attention_mask"] - batch["completion_mask"]).sum(dim=1)
        assert torch.equal(prompts[:8], prompts[8:])  # the same prompt for chosen and rejected
    else:
        lengths = (batch["unpack_index"] >= 0).sum(dim=1)
    assert lengths.max() <= 48
    other = run("shared_prefix" if layout == "padded" else "padded")
    assert trainer.state.log_history[0]["loss"] == pytest.approx(other.state.log_history[0]["loss"], abs=1e-5)


def test_bad_layout_settings_fail_when_the_config_is_built():
    with pytest.raises(ValueError, match="pair_layout"):
        DPOConfig(output_dir="x", pair_layout="unpadded")
    with pytest.raises(ValueError, match="keep_completions"):
        DPOConfig(output_dir="x", truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="max_length"):
        DPOConfig(output_dir="x", max_length=0)
    with pytest.raises(ValueError, match="packing_length"):
        DPOConfig(output_dir="x", packing_length=-1)
    with pytest.raises(ValueError, match="shared_prefix_attention"):
        DPOConfig(output_dir="x", shared_prefix_attention="dense")
