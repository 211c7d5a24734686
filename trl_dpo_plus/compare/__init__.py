"""`compare`: which loss for this data? One run per loss on identical data, seed and schedule, judged on held-out pairs.

    from trl_dpo_plus.compare import compare
    result = compare("Qwen/Qwen2.5-0.5B-Instruct", train, held_out, ["sigmoid", "ipo:beta=0.5", "simpo"])

Each run is an ordinary `DPOPlusTrainer` run (LoRA adapters by default, so a sweep holds one base model at a time) and
saves its adapter, model card and diagnostics under `output_dir/<run>/`. The reference log-probs are computed once:
every run shares `reference_cache_dir` (`trl_dpo_plus.reference_cache`), so the first reference-based run pays the
reference forward over the train and held-out splits and the others read it back, as do later `train`/`compare` runs
on the same data.

The stages, one file each: `runs` (what to run), `pipeline` (`compare()`: train the runs, score them, write),
`held_out` (one pass over the held-out pairs for every trained adapter: rewards as each loss defines them, log-ratios
per token, the exact per-token KL(π‖π_ref)), `sampling` (with a `reward_fn`: samples on held-out prompts from the base
and every adapter, win-rate, mean reward, fluency, sample KL) and `report` (`comparison.md`, `.json`, `.png`). A run
that fails is reported in the table with its error (and `error.txt` in its folder); the other runs go on.
"""

from .held_out import AdapterPolicies, FullPolicy, evaluate_pairs, held_out_metrics, pair_batch
from .pipeline import StepBar, compare, score_held_out, train_runs
from .report import COLUMNS, Comparison, markdown_table, plot_comparison, write_comparison
from .runs import RunResult, RunSpec, parse_run, run_config
from .sampling import (RewardFnError, check_reward_fn, completion_logps, load_reward_fn, prompt_text, sample,
                       scored_samples, win_rate)

__all__ = [
    "COLUMNS",
    "AdapterPolicies",
    "Comparison",
    "FullPolicy",
    "RunResult",
    "RewardFnError",
    "RunSpec",
    "StepBar",
    "check_reward_fn",
    "compare",
    "completion_logps",
    "evaluate_pairs",
    "held_out_metrics",
    "load_reward_fn",
    "markdown_table",
    "pair_batch",
    "parse_run",
    "plot_comparison",
    "prompt_text",
    "run_config",
    "sample",
    "score_held_out",
    "scored_samples",
    "train_runs",
    "win_rate",
    "write_comparison",
]
