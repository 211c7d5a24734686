"""QLoRA and LoRA in one switch: presets, checks, and loading the 4-bit base.

The reference model is the policy's own base with the adapter switched off (TRL's PEFT path): one model in memory,
no copy. Keyword names follow TRL's `ModelConfig` (`lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`,
`bnb_4bit_quant_type`, `use_bnb_nested_quant`, ...), so CLI flags map one to one.

Defaults, and why:
- NF4 with double quantisation (`use_bnb_nested_quant=True`) and bf16 compute: the QLoRA paper's recipe
  (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, §3); double quantisation saves ≈0.37 bit/param.
- LoRA on every linear layer (`"all-linear"`, which PEFT resolves without `lm_head`): the paper finds adapting all
  linear layers is what matches full fine-tuning, and that the rank then matters little.
- r = 16, α = 32 (α/r = 2), dropout 0.05: TRL `ModelConfig`'s and common DPO recipes' values; the paper's 0.05 dropout
  for larger models, a small rank since r barely matters once all layers are adapted.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

def _compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def check_no_lm_head(target_modules: str | list[str] | set[str] | None) -> None:
    """TRL reads log-probs from `lm_head.weight` directly, so an adapter on it would never train."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    if "lm_head" in targets:
        raise ValueError(
            "lm_head in lora_target_modules: TRL computes log-probs from lm_head.weight directly, so an adapter there "
            "would never train. Remove 'lm_head' (the default 'all-linear' already leaves it out)."
        )


def lora_defaults(
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] = "all-linear",
    lora_modules_to_save: list[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> LoraConfig:
    """The LoRA preset (see the module docstring for the reasons), every value overridable."""
    check_no_lm_head(lora_target_modules)
    return LoraConfig(
        task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
        target_modules=lora_target_modules, modules_to_save=lora_modules_to_save, use_rslora=use_rslora,
        use_dora=use_dora,
    )


def qlora_defaults(
    *,
    bnb_4bit_quant_type: str = "nf4",
    use_bnb_nested_quant: bool = True,
    bnb_4bit_compute_dtype: torch.dtype | str | None = None,
    bnb_4bit_quant_storage: str = "uint8",
    **lora_kwargs: Any,
) -> tuple[BitsAndBytesConfig, LoraConfig]:
    """The QLoRA preset `(BitsAndBytesConfig, LoraConfig)` for people who build their models themselves.

    `lora_kwargs` are `lora_defaults`'s (`lora_r`, `lora_alpha`, ...). Compute dtype: bf16, or fp16 on GPUs
    without bf16.
    """
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type, bnb_4bit_use_double_quant=use_bnb_nested_quant,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype or _compute_dtype(), bnb_4bit_quant_storage=bnb_4bit_quant_storage,
    )
    return bnb, lora_defaults(**lora_kwargs)


def check_4bit_possible() -> None:
    """Raise, saying why and offering `lora=True`, where 4-bit loading cannot work on this machine. (A missing
    bitsandbytes is refused earlier, when `DPOPlusConfig(qlora=True)` is built.)"""
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        raise RuntimeError("qlora=True: bitsandbytes has no 4-bit kernels for Apple MPS. Use lora=True instead.")


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_adapter_training(model, args, peft_config=None, quantization_config=None):
    """For `args.qlora`/`args.lora`: the model to hand to TRL (4-bit and kbit-prepared for QLoRA) and its LoRA config."""
    mode = "qlora" if args.qlora else "lora"
    if isinstance(model, PeftModel):
        raise ValueError(
            f"{mode}=True but the model already has adapters (a PeftModel). Pass it with {mode}=False to keep training "
            "that adapter (its frozen copy is the reference), or pass the base model."
        )
    if peft_config is not None:
        check_no_lm_head(getattr(peft_config, "target_modules", None))
    peft_config = peft_config or lora_defaults()
    if mode == "lora":
        return model, peft_config, quantization_config

    check_4bit_possible()
    if not isinstance(model, str):
        if is_quantized(model):
            raise ValueError(
                "qlora=True but the model is already quantised. Pass it with peft_config=qlora_defaults()[1] and "
                "qlora=False, or pass the model's path so trl_dpo_plus loads it in 4-bit."
            )
        raise ValueError(
            "qlora=True needs the model as a path or Hub id so it can be loaded in 4-bit. Pass the path, or use "
            "lora=True to train LoRA on this already loaded model."
        )
    bnb = quantization_config or qlora_defaults()[0]
    init_kwargs = dict(args.model_init_kwargs or {})
    init_kwargs.setdefault("dtype", bnb.bnb_4bit_compute_dtype)
    if torch.cuda.is_available():
        from accelerate import PartialState

        init_kwargs.setdefault("device_map", {"": PartialState().local_process_index})
    loaded = AutoModelForCausalLM.from_pretrained(model, quantization_config=bnb, **init_kwargs)
    loaded = prepare_model_for_kbit_training(
        loaded, use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or {"use_reentrant": False},
    )
    args.model_init_kwargs = None  # consumed here; TRL would otherwise warn that they are ignored
    return loaded, peft_config, None
