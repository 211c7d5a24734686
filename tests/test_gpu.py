"""The checks that need a GPU (run by `benchmarks/gpu_check.sh`): the segment attention's varlen kernel on CUDA in
bf16 against the padded forward, and one QLoRA step with CUDA bitsandbytes. Skipped where there is no CUDA device."""

import pytest
import torch

from test_layout import FAMILIES, tiny_model, token_error, trainer_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_segments_on_cuda_in_bf16_equal_the_padded_forward(family, attn, tokenizer, tmp_path):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    trainer = trainer_for(tiny_model(tmp_path, tokenizer, family, "sdpa"), tokenizer, tmp_path, bf16=True,
                          model_init_kwargs={"attn_implementation": attn, "dtype": torch.bfloat16})
    assert trainer.layout.name == "shared_prefix" and trainer.layout.attention == "segments"
    assert trainer.model.device.type == "cuda"
    assert token_error(trainer) <= 5e-2  # bf16 weights: both layouts round; a wrong mask is off by whole nats


def test_one_qlora_step_with_cuda_bitsandbytes(tiny_models, tokenizer, tmp_path):
    trainer = trainer_for(tiny_models["llama64"], tokenizer, tmp_path, qlora=True, learning_rate=1e-3)
    trainer.train()
    assert trainer.layout.name == "shared_prefix" and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
