"""The data kinds on their own (`trl_dpo_plus.data_kinds`): the typed batch from a `PolicyForward`, and the one
cross-process baseline both kinds share."""

import types

import pytest
import torch

from trl_dpo_plus.data_kinds import PairedKind, UnpairedKind, global_means
from trl_dpo_plus.layout import PolicyForward
from trl_dpo_plus.losses.transforms import f_divergence_scores


def accelerator(processes=1, other=None):
    """One process, or a stand-in for `processes` whose other ranks hold `other` (a reduce sums both)."""
    def reduce(tensor, reduction="sum"):
        total = tensor + (other(tensor) if other else 0)
        return total / processes if reduction == "mean" else total
    return types.SimpleNamespace(reduce=reduce, num_processes=processes)


def forward(logps, lengths):
    lengths = torch.tensor(lengths)
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    zeros = torch.zeros(mask.shape)
    return PolicyForward(per_token_logps=zeros, mask=mask, logps=torch.tensor(logps), entropy=zeros,
                         mean_logits=zeros, is_top1=zeros)


def test_global_means_average_every_processes_rows():
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, -3.0, 6.0])]
    theirs = [torch.tensor([5.0, 5.0, 5.0]), torch.tensor([1.0, 1.0, 1.0])]
    stacked = lambda t: torch.stack([v.sum() for v in theirs] + [torch.tensor(3.0)])  # noqa: E731
    mean_a, mean_b = global_means(values, accelerator(2, stacked).reduce)
    assert mean_a.item() == pytest.approx((6 + 15) / 6) and mean_b.item() == pytest.approx((3 + 3) / 6)


def test_paired_batch_carries_log_ratios_kl_baselines_and_f_divergence_scores():
    kind = PairedKind(requires_kl=True, f_divergence_type="js_divergence")
    fwd = forward([-1.0, -2.0, -5.0, -6.0], [2, 3, 1, 4])  # chosen 1..2, then rejected 1..2
    reference = (torch.tensor([-1.5, -1.0]), torch.tensor([-4.0, -4.0]))
    batch = kind.build_batch(fwd, reference, {}, accelerator())
    assert batch.chosen_logps.tolist() == [-1.0, -2.0] and batch.rejected_lengths.tolist() == [1, 4]
    assert batch.chosen_kl.item() == pytest.approx((0.5 - 1.0) / 2)
    assert batch.rejected_kl.item() == pytest.approx((-1.0 - 2.0) / 2)
    torch.testing.assert_close(batch.chosen_scores, f_divergence_scores(torch.tensor([0.5, -1.0]), "js_divergence", 1.0))
    assert batch.chosen_tokens is None  # one process: the loss counts this batch's tokens itself
    assert kind.build_batch(fwd, None, {}, accelerator()).ref_chosen_logps is None


def test_unpaired_batch_takes_z0_from_the_kl_completions_only():
    kind = UnpairedKind(calculate_KL=True)
    fwd = forward([-1.0, -3.0, -2.0, -8.0], [2, 2, 5, 1])  # completions 1..2, then their KL completions
    reference = (torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -6.0]))
    batch = kind.build_batch(fwd, reference, {"label": torch.tensor([1, 0])}, accelerator())
    assert batch.labels.tolist() == [True, False] and batch.lengths.tolist() == [2, 2]
    assert batch.kl.item() == pytest.approx(((-2.0 + 2.5) + (-8.0 + 6.0)) / 2)
    assert UnpairedKind(calculate_KL=False).build_batch(fwd, reference, {"label": torch.tensor([1, 0])},
                                                        accelerator()).kl is None
    assert UnpairedKind(calculate_KL=False).token_columns == ("prompt_ids", "completion_ids")
