"""Launched by tests/test_distributed.py with `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank records what its loss function actually received (the KL baselines and its own pairs' Δw) and what the
diagnostics saw (the gathered pair statistics). With `kto` or `trl_kto` as the loss, it trains on unpaired rows with
DPOPlusTrainer or with trl.KTOTrainer itself.
"""

import dataclasses
import json
import sys

sys.path.insert(0, sys.argv[3])
import trl  # noqa: E402
from conftest import make_pairs, make_unpaired  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from trl_dpo_plus import DPOConfig, DPOTrainer  # noqa: E402

model_path, out_path = sys.argv[1], sys.argv[2]
layout = sys.argv[4] if len(sys.argv) > 4 else "auto"
loss_type = sys.argv[5].split(",") if len(sys.argv) > 5 else ["kto_pair"]
batch_size = int(sys.argv[6]) if len(sys.argv) > 6 else 3
common = dict(output_dir=out_path, max_steps=2, per_device_train_batch_size=batch_size, learning_rate=1e-3,
              logging_steps=1, report_to=[], save_strategy="no", seed=0)
tokenizer = AutoTokenizer.from_pretrained(model_path)
if loss_type == ["trl_kto"]:
    trainer = trl.KTOTrainer(model_path, args=trl.KTOConfig(**common, use_cpu=True, bf16=False),
                             train_dataset=make_unpaired(24), processing_class=tokenizer)
    trainer.loss_specs, trainer.layout = [None], None
else:
    args = DPOConfig(**common, loss_type=loss_type, pair_layout=layout)
    data = make_unpaired(24) if loss_type == ["kto"] else make_pairs(24)
    trainer = DPOTrainer(model_path, args=args, train_dataset=data, processing_class=tokenizer)

seen = []
spec = trainer.loss_specs[0]


def recording_loss(batch, **kwargs):
    dw = (batch.chosen_logps - batch.ref_chosen_logps).detach()
    seen.append({"chosen_kl": float(batch.chosen_kl), "local_dw": dw.tolist()})
    return spec.fn(batch, **kwargs)


def recording_unpaired_loss(batch, **kwargs):
    seen.append({"kl": float(batch.kl)})
    return spec.fn(batch, **kwargs)


if spec is not None and spec.name in ("kto_pair", "kto"):
    recording = recording_loss if spec.name == "kto_pair" else recording_unpaired_loss
    trainer.loss_specs[0] = dataclasses.replace(spec, fn=recording)


class PairsSeen(TrainerCallback):
    pairs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        last = trainer.statistics.last if hasattr(trainer, "statistics") else {}  # what the detectors read now
        if "margin" in last:
            self.pairs.append(int(last["margin"].numel()))


trainer.add_callback(PairsSeen())
trainer.train()
rank = trainer.accelerator.process_index
with open(f"{out_path}/rank{rank}.json", "w") as f:
    json.dump({"world_size": trainer.accelerator.num_processes, "seen": seen, "pairs_logged": PairsSeen.pairs,
               "layout": getattr(trainer.layout, "name", None), "layout_check": getattr(trainer, "layout_check", None),
               "kl": [h["kl"] for h in trainer.state.log_history if "kl" in h],
               "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h],
               "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]}, f)
if hasattr(trainer, "end"):
    trainer.end()  # as scripts end: waits for every rank, then destroys the process group
