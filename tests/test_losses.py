"""Every loss against an independent formula written out here, plus properties checked across the registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_dpo_plus.losses import (
    LossOutput,
    PreferenceBatch,
    UnpairedBatch,
    UnpairedLossOutput,
    get_loss,
    list_losses,
)

# -- independent formulas, in float64, from the papers / TRL 1.16 `_compute_loss` --------------------------------
# x: dict with lw, ll, rw, rl, nw, nl (lengths). Each returns the per-pair loss vector.
ls = F.logsigmoid
sg = torch.sigmoid


def _h(x):
    return (x["lw"] - x["rw"]) - (x["ll"] - x["rl"])


def _nll(x):  # token mean of the chosen NLL over the batch
    return -x["lw"].sum() / x["nw"].sum()


REFERENCE = {
    "sigmoid": lambda x, beta: -ls(beta * _h(x)),
    "hinge": lambda x, beta: torch.relu(1 - beta * _h(x)),
    "robust": lambda x, beta, label_smoothing: (
        -(1 - label_smoothing) * ls(beta * _h(x)) + label_smoothing * ls(-beta * _h(x))
    ) / (1 - 2 * label_smoothing),
    "exo_pair": lambda x, beta, label_smoothing: sg(beta * _h(x)) * (ls(beta * _h(x)) - math.log(1 - label_smoothing))
    + sg(-beta * _h(x)) * (ls(-beta * _h(x)) - math.log(label_smoothing)),
    "discopop": lambda x, beta, tau: -ls(beta * _h(x)) * (1 - sg(beta * _h(x) / tau))
    + torch.exp(-beta * _h(x)) * sg(beta * _h(x) / tau),
    "aot": lambda x, beta, label_smoothing: -(1 - label_smoothing)
    * ls(beta * (torch.sort(x["lw"] - x["ll"])[0] - torch.sort(x["rw"] - x["rl"])[0]))
    - label_smoothing * ls(-beta * (torch.sort(x["lw"] - x["ll"])[0] - torch.sort(x["rw"] - x["rl"])[0])),
    "aot_unpaired": lambda x, beta, label_smoothing: -(1 - label_smoothing)
    * ls(beta * (torch.sort(x["lw"] - x["rw"])[0] - torch.sort(x["ll"] - x["rl"])[0]))
    - label_smoothing * ls(-beta * (torch.sort(x["lw"] - x["rw"])[0] - torch.sort(x["ll"] - x["rl"])[0])),
    "ipo": lambda x, beta: ((x["lw"] - x["rw"]) / x["nw"] - (x["ll"] - x["rl"]) / x["nl"] - 1 / (2 * beta)) ** 2,
    "ipo_sum": lambda x, beta: (_h(x) - 1 / (2 * beta)) ** 2,
    "sppo_hard": lambda x, beta: (x["lw"] - x["rw"] - 0.5 / beta) ** 2 + (x["ll"] - x["rl"] + 0.5 / beta) ** 2,
    "nca_pair": lambda x, beta: -ls(beta * (x["lw"] - x["rw"]))
    - 0.5 * ls(-beta * (x["lw"] - x["rw"]))
    - 0.5 * ls(-beta * (x["ll"] - x["rl"])),
    "bco_pair": lambda x, beta: -ls(beta * (x["lw"] - x["rw"])) - ls(-beta * (x["ll"] - x["rl"])),
    "apo_zero": lambda x, beta: 1 - sg(beta * (x["lw"] - x["rw"])) + sg(beta * (x["ll"] - x["rl"])),
    "apo_down": lambda x, beta: sg(beta * (x["lw"] - x["rw"])) + 1 - sg(beta * _h(x)),
    "sft": lambda x, beta: _nll(x).expand_as(x["lw"]),
    "rpo": lambda x, beta, alpha: -ls(beta * _h(x)) + alpha * _nll(x),
    "sigmoid_norm": lambda x, beta: -ls(beta * ((x["lw"] - x["rw"]) / x["nw"] - (x["ll"] - x["rl"]) / x["nl"])),
    "ln_dpo": lambda x, beta: -ls(beta * ((x["lw"] - x["rw"]) / x["nw"] - (x["ll"] - x["rl"]) / x["nl"])),
    "rdpo": lambda x, beta, alpha: -ls(beta * _h(x) + alpha * (x["nw"] - x["nl"])),
    "dpop": lambda x, beta, lambda_: -ls(beta * (_h(x) - lambda_ * torch.relu(x["rw"] - x["lw"]))),
    "kto_pair": lambda x, beta: 0.5 * (
        (1 - sg(beta * ((x["lw"] - x["rw"]) - (x["ll"] - x["rl"]).mean().clamp(min=0).detach())))
        + (1 - sg(beta * ((x["lw"] - x["rw"]).mean().clamp(min=0).detach() - (x["ll"] - x["rl"]))))
    ),
    "simpo": lambda x, beta, gamma: -ls(beta * x["lw"] / x["nw"] - beta * x["ll"] / x["nl"] - gamma),
    "orpo": lambda x, beta: _nll(x)
    - beta
    * ls(
        (x["lw"] / x["nw"] - x["ll"] / x["nl"])
        - (torch.log(1 - torch.exp(x["lw"] / x["nw"])) - torch.log(1 - torch.exp(x["ll"] / x["nl"])))
    ),
    "cpo": lambda x, beta, alpha: -ls(beta * (x["lw"] - x["ll"])) + alpha * _nll(x),
}

# Non-default hyperparameters, so a parity test also proves each one is wired in.
PARAMS = {
    "robust": {"label_smoothing": 0.1},
    "exo_pair": {"label_smoothing": 0.01},
    "discopop": {"tau": 0.1},
    "aot": {"label_smoothing": 0.05},
    "aot_unpaired": {"label_smoothing": 0.05},
    "rpo": {"alpha": 0.5},
    "rdpo": {"alpha": 0.02},
    "dpop": {"lambda_": 5.0},
    "simpo": {"gamma": 0.6},
    "cpo": {"alpha": 0.7},
}

REFERENCE_FREE_REWARD = {  # reward each reference-free loss logs: (chosen, rejected)
    "simpo": lambda x, beta: (beta * x["lw"] / x["nw"], beta * x["ll"] / x["nl"]),
    "orpo": lambda x, beta: (beta * x["lw"] / x["nw"], beta * x["ll"] / x["nl"]),
    "sft": lambda x, beta: (beta * x["lw"] / x["nw"], beta * x["ll"] / x["nl"]),
    "cpo": lambda x, beta: (beta * x["lw"], beta * x["ll"]),
}

BUILTIN = sorted(REFERENCE)


def make_inputs(batch_size, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(1, 40, (batch_size,), generator=g)
    nl = torch.randint(1, 40, (batch_size,), generator=g)
    # summed log-probs ~ −(1.5 ± noise) per token, policy and reference close but different
    rw = -(1.5 + 0.3 * torch.rand(batch_size, generator=g)) * nw
    rl = -(1.5 + 0.3 * torch.rand(batch_size, generator=g)) * nl
    lw = rw + scale * torch.randn(batch_size, generator=g)
    ll = rl + scale * torch.randn(batch_size, generator=g)
    x = {"lw": lw, "ll": ll, "rw": rw, "rl": rl, "nw": nw.double(), "nl": nl.double()}
    return {k: v.to(dtype) for k, v in x.items()}


def to_batch(x, with_reference=True):
    return PreferenceBatch(
        chosen_logps=x["lw"],
        rejected_logps=x["ll"],
        ref_chosen_logps=x["rw"] if with_reference else None,
        ref_rejected_logps=x["rl"] if with_reference else None,
        chosen_lengths=x["nw"],
        rejected_lengths=x["nl"],
    )


PAIRED = [n for n in list_losses() if get_loss(n).data == "paired"]


def test_every_builtin_loss_has_an_independent_formula():
    builtin = {n for n in list_losses() if get_loss(n).fn.__module__.startswith("trl_dpo_plus.")}
    covered = set(REFERENCE) | set(REFERENCE_UNPAIRED)
    assert builtin == covered, f"add an independent formula for: {sorted(builtin ^ covered)}"
    assert len(builtin) >= 25


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize(
    "dtype,loss_tol,grad_tol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 5e-2)], ids=["fp32", "bf16"]
)
def test_parity_with_independent_formula(name, batch_size, dtype, loss_tol, grad_tol):
    spec = get_loss(name)
    kwargs = {**spec.defaults, **PARAMS.get(name, {})}
    x64 = make_inputs(batch_size, torch.float64, seed=batch_size)
    # the loss under test runs in `dtype`; the reference runs in float64 on the same (rounded) inputs
    x = {k: v.to(dtype) for k, v in x64.items()}
    x_ref = {k: v.double() for k, v in x.items()}
    for d in (x, x_ref):
        d["lw"].requires_grad_(True)
        d["ll"].requires_grad_(True)

    out = spec(to_batch(x, with_reference=spec.requires_reference), **kwargs)
    expected = REFERENCE[name](x_ref, **kwargs)

    assert out.losses.shape == (batch_size,)
    assert out.losses.dtype == dtype
    torch.testing.assert_close(out.losses.double(), expected, rtol=loss_tol, atol=loss_tol)

    out.losses.mean().backward()
    expected.mean().backward()
    grad = lambda t: torch.zeros_like(t, dtype=torch.float64) if t.grad is None else t.grad.double()  # noqa: E731
    assert x["lw"].grad is not None, "no gradient reached the chosen policy log-probs"
    for key in ("lw", "ll"):
        torch.testing.assert_close(grad(x[key]), grad(x_ref[key]), rtol=grad_tol, atol=grad_tol)

    if spec.requires_reference:
        beta = kwargs["beta"]
        want = (beta * (x_ref["lw"] - x_ref["rw"]), beta * (x_ref["ll"] - x_ref["rl"]))
    else:
        want = REFERENCE_FREE_REWARD[name](x_ref, kwargs["beta"])
    torch.testing.assert_close(out.chosen_rewards.double(), want[0].detach(), rtol=loss_tol, atol=loss_tol)
    torch.testing.assert_close(out.rejected_rewards.double(), want[1].detach(), rtol=loss_tol, atol=loss_tol)


@pytest.mark.parametrize("name", PAIRED)
def test_registry_wide_properties(name):
    """Shape, detached rewards, gradient to policy only, finite at extremes and at zero length."""
    spec = get_loss(name)
    x = make_inputs(5, torch.float32, seed=1)
    for key in ("lw", "ll", "rw", "rl"):
        x[key].requires_grad_(True)
    out = spec(to_batch(x), **spec.defaults)  # reference given even when not needed: must be accepted
    assert isinstance(out, LossOutput)
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (5,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert x["lw"].grad is not None and x["lw"].grad.abs().sum() > 0
    for key in ("rw", "rl"):
        assert x[key].grad is None or torch.all(x[key].grad == 0), f"gradient reached the reference ({key})"

    # extreme log-prob differences (±1e4) and zero-length completions stay finite
    n = torch.tensor([0.0, 1.0, 3.0, 0.0])
    extreme = {
        "lw": torch.tensor([-1e4, 0.0, -3.0, -1e-9], requires_grad=True),
        "ll": torch.tensor([0.0, -1e4, -1e4, 0.0], requires_grad=True),
        "rw": torch.tensor([0.0, -1e4, -1e4, 0.0]),
        "rl": torch.tensor([-1e4, 0.0, -3.0, 0.0]),
        "nw": n,
        "nl": n.flip(0),
    }
    out = spec(to_batch(extreme, with_reference=spec.requires_reference), **spec.defaults)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    for key in ("lw", "ll"):
        assert extreme[key].grad is None or torch.isfinite(extreme[key].grad).all(), key


@pytest.mark.parametrize("name", [n for n in PAIRED if not get_loss(n).requires_reference])
def test_reference_free_losses_accept_no_reference(name):
    spec = get_loss(name)
    out = spec(to_batch(make_inputs(4, torch.float32), with_reference=False), **spec.defaults)
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("name", [n for n in PAIRED if get_loss(n).requires_reference])
def test_reference_losses_say_so_without_reference(name):
    spec = get_loss(name)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        spec(to_batch(make_inputs(4, torch.float32), with_reference=False), **spec.defaults)


def test_worked_example_from_the_brief():
    """Implicit rewards 0.310 / −0.080 at β = 0.1 → margin 0.390 → σ = 0.596, loss 0.517."""
    beta = 0.1
    batch = PreferenceBatch(
        chosen_logps=torch.tensor([-10.0 + 3.10]),
        rejected_logps=torch.tensor([-12.0 - 0.80]),
        ref_chosen_logps=torch.tensor([-10.0]),
        ref_rejected_logps=torch.tensor([-12.0]),
        chosen_lengths=torch.tensor([5]),
        rejected_lengths=torch.tensor([5]),
    )
    out = get_loss("sigmoid")(batch, beta=beta)
    assert out.chosen_rewards.item() == pytest.approx(0.310, abs=1e-5)
    assert out.rejected_rewards.item() == pytest.approx(-0.080, abs=1e-5)
    margin = (out.chosen_rewards - out.rejected_rewards).item()
    assert margin == pytest.approx(0.390, abs=1e-5)
    assert math.exp(-out.losses.item()) == pytest.approx(0.596, abs=5e-4)  # P(chosen ≻ rejected) = σ(margin)
    assert out.losses.item() == pytest.approx(0.517, abs=5e-4)

    # DPO's gradient weight: d loss / d(βh) = −σ(−βh). ≈ 0.000 when strongly right, ≈ 0.993 when strongly wrong.
    def weight(h):
        lw = torch.tensor([h], requires_grad=True)
        zero = torch.zeros(1)
        batch = PreferenceBatch(
            chosen_logps=lw,
            rejected_logps=zero,
            ref_chosen_logps=zero,
            ref_rejected_logps=zero,
            chosen_lengths=torch.ones(1),
            rejected_lengths=torch.ones(1),
        )
        loss = get_loss("sigmoid")(batch, beta=beta).losses.sum()
        loss.backward()
        return -lw.grad.item() / beta

    assert weight(100.0) == pytest.approx(0.000, abs=5e-4)
    assert weight(-50.0) == pytest.approx(0.993, abs=5e-4)


# -- unpaired losses (KTO-style rows): an independent per-row formula, written from the papers -------------------
def _kto_row(delta, good, z0, beta, desirable_weight, undesirable_weight):
    """KTO Eq. 7/8 for one row: v = λD·σ(β(r − z0)) if desirable, λU·σ(β(z0 − r)) if not; loss = λ − v."""
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    if good:
        return desirable_weight - desirable_weight * sig(beta * (delta - z0))
    return undesirable_weight - undesirable_weight * sig(beta * (z0 - delta))


def _apo_row(delta, good, z0, beta, desirable_weight, undesirable_weight):
    sig = 1 / (1 + math.exp(-beta * delta))
    return desirable_weight * (1 - sig) if good else undesirable_weight * sig


REFERENCE_UNPAIRED = {"kto": _kto_row, "apo_zero_unpaired": _apo_row}


def unpaired_batch(seed=0, kl=0.3, n=6):
    g = torch.Generator().manual_seed(seed)
    logps = (-20 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = (-20 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.tensor([True, False, True, True, False, False][:n])
    return UnpairedBatch(logps=logps, ref_logps=ref, lengths=torch.arange(1, n + 1), labels=labels,
                         kl=torch.tensor(kl, dtype=torch.float64))


@pytest.mark.parametrize("kl", [0.3, -0.2], ids=["kl", "negative-kl-clamped"])
@pytest.mark.parametrize("name", sorted(REFERENCE_UNPAIRED))
def test_unpaired_losses_match_the_row_formula(name, kl):
    params = {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.7}
    batch = unpaired_batch(kl=kl)
    out = get_loss(name)(batch, **params)
    assert isinstance(out, UnpairedLossOutput) and get_loss(name).data == "unpaired"
    z0 = max(kl, 0.0)  # KTO clamps the baseline at 0
    expected = [REFERENCE_UNPAIRED[name]((lp - rp).item(), good.item(), z0, **params)
                for lp, rp, good in zip(batch.logps, batch.ref_logps, batch.labels)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.rewards, 0.5 * (batch.logps - batch.ref_logps).detach())
    assert not out.rewards.requires_grad
    out.losses.sum().backward()
    assert batch.logps.grad.abs().sum() > 0
    assert batch.ref_logps.grad is None, "gradient reached the reference"
    if name == "kto":
        assert out.metrics["kl"].item() == pytest.approx(z0)


def test_kto_needs_its_kl_baseline_and_a_reference():
    batch = unpaired_batch()
    with pytest.raises(ValueError, match="KL baseline"):
        get_loss("kto")(UnpairedBatch(logps=batch.logps, ref_logps=batch.ref_logps, lengths=batch.lengths,
                                      labels=batch.labels), beta=0.1)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        get_loss("apo_zero_unpaired")(UnpairedBatch(logps=batch.logps, lengths=batch.lengths, labels=batch.labels),
                                      beta=0.1)
    with pytest.raises(TypeError, match="labels must be a bool tensor"):
        UnpairedBatch(logps=batch.logps, lengths=batch.lengths, labels=batch.labels.long())
