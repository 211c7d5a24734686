"""A compact per-step console line; trackers and `trainer_state.json` still get every metric.

Transformers prints the whole log dict at every logging step: with the diagnostics that is about 40 keys (1.4 kB) a line.
`console_log="compact"` prints the metrics a person watches (TRL's loss, reward and log-prob headline numbers) and,
when one is raised, the diagnostics flags by name; `console_log="full"` prints everything, as TRL does.
"""

from __future__ import annotations

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .metrics import CONSOLE_KEYS, FLAG_PREFIX


def compact_logs(logs: dict) -> dict:
    """The console subset of one log: CONSOLE_KEYS (also as eval_/train_ metrics) and the raised flags' names."""
    kept, flags = {}, []
    for key, value in logs.items():
        bare = key.removeprefix("eval_").removeprefix("train_")
        if bare.startswith(FLAG_PREFIX):
            flags.append(bare[len(FLAG_PREFIX):])
        elif bare in CONSOLE_KEYS:
            kept[key] = value
    if flags:
        kept["flags"] = ",".join(flags)
    return kept


class CompactProgressCallback(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=compact_logs(logs or {}), **kwargs)


class CompactPrinterCallback(PrinterCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=compact_logs(logs or {}), **kwargs)


def install_compact_console(trainer) -> None:
    """Swap Transformers' progress/printer callback for its compact twin (the same bar, a shorter line)."""
    for original, compact in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
        for callback in list(trainer.callback_handler.callbacks):
            if type(callback) is original:
                trainer.callback_handler.remove_callback(callback)
                trainer.callback_handler.add_callback(compact())
