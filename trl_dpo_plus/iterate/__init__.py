"""`iterate`: on-policy ("batch-online") rounds for any registered loss.

    from trl_dpo_plus.iterate import iterate
    report = iterate("Qwen/Qwen2.5-0.5B-Instruct", prompts, held_out_prompts, config, reward_fn=my_scorer, rounds=3)

Each round samples the training prompts from the current policy (`compare.sampling.sample`: batched, left-padded,
adapter enabled, seed `args.seed + round`), scores the samples through the same `compare.sampling.score` path as
`compare --reward_fn` (or a local reward model, `RewardModelScorer`), builds rows for the loss's data kind from the
registry (`pairs`: best-vs-worst pairs, or labelled completions for unpaired losses; ties dropped and counted) and
trains one ordinary `DPOPlusTrainer` run from the previous round's weights, its reference log-probs precomputed
once through the reference cache. After every round the held-out prompts are sampled and `report` is rewritten.

The files: `rounds` (`iterate()`: the loop, the models, one round), `pairs`, `scoring`, `report`.
"""

from .pairs import best_vs_worst, labelled
from .report import IterateReport, markdown_table, plot_rounds, write_report
from .rounds import REFERENCES, distinct_prompts, iterate
from .scoring import RewardModelScorer

__all__ = [
    "REFERENCES",
    "IterateReport",
    "RewardModelScorer",
    "best_vs_worst",
    "distinct_prompts",
    "iterate",
    "labelled",
    "markdown_table",
    "plot_rounds",
    "write_report",
]
