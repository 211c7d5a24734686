"""Register your own preference loss and train with it: `python examples/custom_loss.py`.

Runs offline on the CPU in seconds with the embedded stories260K model.
"""

import torch.nn.functional as F
from datasets import Dataset

from trl_dpo_plus import DPOConfig, DPOTrainer, LossOutput, PreferenceBatch, default_model_path, register_loss


@register_loss("margin_dpo", requires_reference=True, ranges={"beta": "(0, inf)", "margin": "[0, inf)"})
def margin_dpo(batch: PreferenceBatch, *, beta: float = 0.1, margin: float = 0.5) -> LossOutput:
    """DPO with a target margin.

    Loss: −logσ(β(Δw − Δl) − margin)
    Use: when you want DPO to keep pushing until the implicit reward gap exceeds a margin.
    """
    dw = batch.chosen_logps - batch.ref_chosen_logps
    dl = batch.rejected_logps - batch.ref_rejected_logps
    return LossOutput(-F.logsigmoid(beta * (dw - dl) - margin), beta * dw.detach(), beta * dl.detach())


def main():
    pairs = Dataset.from_list([
        {"prompt": "Once upon a time, Lily found a ball.", "chosen": " She shared it and smiled.",
         "rejected": " She broke it and cried."},
        {"prompt": "Tom saw a dog in the park.", "chosen": " He gave it a hug and they played.",
         "rejected": " He was mean to it and it ran away."},
    ] * 8)
    args = DPOConfig(output_dir="outputs/custom-loss", loss_type="margin_dpo", loss_kwargs={"margin_dpo": {"margin": 1.0}},
                     max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=3, report_to="none",
                     disable_tqdm=True)
    trainer = DPOTrainer(default_model_path(), args=args, train_dataset=pairs)
    trainer.train()
    first, last = trainer.state.log_history[0], trainer.state.log_history[-2]
    print(f"margin_dpo: loss {first['loss']:.3f} → {last['loss']:.3f}, "
          f"reward margin {first['rewards/margins']:.3f} → {last['rewards/margins']:.3f}")
    return trainer


if __name__ == "__main__":
    main()
