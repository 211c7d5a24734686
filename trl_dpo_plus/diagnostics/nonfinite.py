"""Non-finite losses, log-probs or gradients, flagged at the step they appear; `stop`/`checkpoint` skip that update."""

from __future__ import annotations

import torch

from .base import DiagnosticCallback, Flag


class NonFiniteCallback(DiagnosticCallback):
    """Flags `nonfinite` at the step where the loss, the policy or reference log-probs, or a gradient first stops
    being finite, naming which.

    The trainer records whether each micro-batch's loss and log-probs were finite (`record`); this callback checks
    the gradients after clipping and before the optimizer step, and agrees across processes. With `stop` or
    `checkpoint` it drops that step's gradients, so the optimizer skips the update and the weights stay finite, and
    training stops there; with `warn` it logs the flag once per episode and training goes on. The step is always
    logged, so the flag carries its own step (Transformers' NaN filter would otherwise hide a NaN loss in the average).
    """

    name = "nonfinite"
    QUANTITIES = ("loss", "policy_logps", "reference_logps", "gradients")
    remedies = (
        "lower the learning rate (or raise warmup); keep max_grad_norm > 0; train in float32 or bf16 rather than fp16; "
        "check the model's weights and the loss_weights/loss_kwargs for NaN or Infinity; set "
        "diagnostics_action='stop' to stop before a non-finite update reaches the weights"
    )

    def __init__(self, *, action: str = "warn"):
        super().__init__(window=2, action=action)
        self._window_explicit = False  # two logs at most; a shorter run shrinks it instead of refusing
        self._step_checks: torch.Tensor | None = None  # per quantity: True while everything this step was finite
        self._seen: dict[str, int] = {}  # quantity -> first step it was non-finite, since the last log

    def record(self, loss: torch.Tensor, policy_logps: torch.Tensor, reference_logps: torch.Tensor | None) -> None:
        """Called by the trainer for every training micro-batch (no device sync here)."""
        ref_ok = reference_logps.isfinite().all() if reference_logps is not None else loss.new_ones((), dtype=torch.bool)
        checks = torch.stack([loss.detach().isfinite().all(), policy_logps.detach().isfinite().all(), ref_ok])
        self._step_checks = checks if self._step_checks is None else self._step_checks & checks

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        checks, self._step_checks = self._step_checks, None
        if checks is None:
            return control
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        grads_ok = torch.stack([g.isfinite().all() for g in grads]).all().to(checks.device) if grads else checks[0]
        bad = (~torch.cat([checks, grads_ok.reshape(1)])).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        names = [q for q, b in zip(self.QUANTITIES, bad.tolist()) if b > 0]
        if not names:
            return control
        step = state.global_step + 1  # the step being taken
        for name in names:
            self._seen.setdefault(name, step)
        if self.action != "warn" or "nonfinite" not in self._active:
            control.should_log = True  # log the step where an episode starts, so the flag carries its step
        if self.action in ("stop", "checkpoint"):
            for p in model.parameters():  # no update from this step: the weights stay as they were
                p.grad = None
            control.should_training_stop = True
        return control

    def init_args(self) -> dict:
        return {"action": self.action}  # its window is fixed

    def evaluate(self, step, stats):
        seen, self._seen = self._seen, {}
        metrics = {f"nonfinite/{q}": float(q in seen) for q in self.QUANTITIES}
        if not seen:
            return metrics, []
        first = min(seen.values())
        return metrics, [Flag(self.name, "nonfinite", first, f"non-finite {', '.join(seen)} at step {first}",
                              {"first_step": float(first)})]

    def _save_healthy(self, args, model, processing_class=None):
        if self._healthy_snapshot is None and model is not None:  # the update was skipped: these weights are finite
            self._healthy_snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._healthy_step = self._last_step or 0
        super()._save_healthy(args, model)
