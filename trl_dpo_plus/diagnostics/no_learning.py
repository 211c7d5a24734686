"""No learning: reward margins that stay within noise, typically a learning rate far too low for the run."""

from __future__ import annotations

from .base import DiagnosticCallback, Flag, check_positive


class NoLearningCallback(DiagnosticCallback):
    """Flags `not_learning` when, over the first `window` logged steps, the mean |reward margin| of every logged step
    stayed below `margin_tolerance`: the policy is where it started. The usual cause is a learning rate meant for
    another setting (TRL's default 1e-6 with LoRA adapters, which learn nothing at it in tens of steps).

    Args:
        window: logged steps to watch (default 10); runs that log fewer than 5 times are not judged.
        margin_tolerance: the mean |margin| (the loss's own reward scale) under which a step counts as no change.
        action: `warn` (log once), `stop`, or `checkpoint`.
    """

    name = "no_learning"
    needs = ("margin",)
    default_window = 10
    remedies = ("raise the learning rate: LoRA/QLoRA adapters usually train at 1e-5 to 1e-4, full fine-tuning at "
                "5e-7 to 5e-6 (TRL's default 1e-6 is a full fine-tuning rate)")
    min_logs = 5

    def __init__(self, *, window: int | None = None, margin_tolerance: float = 1e-2, action: str = "warn"):
        super().__init__(window=window, action=action)
        check_positive("NoLearningCallback: margin_tolerance", margin_tolerance)
        self.margin_tolerance = margin_tolerance
        self.learning_rate: float | None = None
        self._judged = False

    def init_args(self) -> dict:
        return {**super().init_args(), "margin_tolerance": self.margin_tolerance}

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.learning_rate = args.learning_rate

    def evaluate(self, step, stats):
        margin = stats["margin"].double().abs().mean().item()
        self.history.append({"no_learning/abs_margin": margin})
        flags = []
        if len(self.history) == self.window and self.window >= self.min_logs and not self._judged:
            self._judged = True  # once, on the first full window: a run that learns later is not flagged again
            largest = max(h["no_learning/abs_margin"] for h in self.history)
            if largest < self.margin_tolerance:
                flags.append(Flag(self.name, "not_learning", step,
                                  f"over the first {self.window} logged steps the mean |reward margin| stayed below "
                                  f"{self.margin_tolerance:g} (largest {largest:.2g}) at learning_rate="
                                  f"{self.learning_rate:g}: the policy has barely moved",
                                  {"largest_abs_margin": largest, "learning_rate": self.learning_rate or 0.0}))
        return {"no_learning/abs_margin": margin}, flags

    def reset(self) -> None:
        super().reset()
        self._judged = False

    @property
    def saved_state(self) -> dict:
        return {**super().saved_state, "judged": self._judged}

    @saved_state.setter
    def saved_state(self, saved: dict) -> None:
        DiagnosticCallback.saved_state.fset(self, saved)
        self._judged = saved.get("judged", False)
