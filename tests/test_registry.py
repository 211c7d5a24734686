import sys
import textwrap

import pytest
import torch

import trl_dpo_plus.losses.registry as registry
from trl_dpo_plus.losses import LossOutput, PreferenceBatch, get_loss, list_losses, register_loss, validate_loss_kwargs


def test_duplicate_name_raises(clean_registry):
    with pytest.raises(ValueError, match="already registered"):

        @register_loss("sigmoid", requires_reference=True)
        def mine(batch, *, beta=0.1):
            raise AssertionError

    assert get_loss("sigmoid").fn.__module__ == "trl_dpo_plus.losses.dpo"  # not overwritten


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"Unknown loss 'sigmod'\. Did you mean 'sigmoid'\? Available: .*simpo"):
        get_loss("sigmod")


@pytest.mark.parametrize("bad", ["SimPO", "my-loss", "1loss", ""])
def test_names_are_snake_case(bad):
    with pytest.raises(ValueError, match="snake_case"):
        register_loss(bad, requires_reference=False)


def test_beta_must_be_keyword_only(clean_registry):
    with pytest.raises(TypeError, match="keyword-only"):

        @register_loss("no_beta", requires_reference=False)
        def no_beta(batch, beta=0.1):
            raise AssertionError


def test_hyperparameters_are_validated():
    assert validate_loss_kwargs("simpo", {"gamma": 0.5}) == {"beta": 2.0, "gamma": 0.5}
    with pytest.raises(ValueError, match=r"no hyperparameter 'gama'\. Did you mean 'gamma'\?"):
        validate_loss_kwargs("simpo", {"gama": 0.5})
    with pytest.raises(ValueError, match=r"label_smoothing=0\.6 is out of range; it must lie in \[0, 0\.5\)"):
        validate_loss_kwargs("robust", {"label_smoothing": 0.6})
    with pytest.raises(ValueError, match=r"beta=0 is out of range"):
        validate_loss_kwargs("sigmoid", {"beta": 0})
    with pytest.raises(TypeError, match="must be a number"):
        validate_loss_kwargs("sigmoid", {"beta": "0.1"})


def test_user_loss_registers_and_runs(clean_registry):
    @register_loss("margin_mse", requires_reference=True, ranges={"beta": "(0, inf)"})
    def margin_mse(batch: PreferenceBatch, *, beta: float = 0.1, target: float = 1.0) -> LossOutput:
        """Margin MSE.

        Loss: (β·h − target)²
        """
        h = (batch.chosen_logps - batch.ref_chosen_logps) - (batch.rejected_logps - batch.ref_rejected_logps)
        return LossOutput((beta * h - target) ** 2, h.detach(), -h.detach())

    assert "margin_mse" in list_losses()
    spec = get_loss("margin_mse")
    assert spec.defaults == {"beta": 0.1, "target": 1.0} and spec.formula == "(β·h − target)²"
    z = torch.zeros(2)
    batch = PreferenceBatch(
        chosen_logps=torch.tensor([1.0, 2.0]),
        rejected_logps=z,
        ref_chosen_logps=z,
        ref_rejected_logps=z,
        chosen_lengths=z + 1,
        rejected_lengths=z + 1,
    )
    out = spec(batch, beta=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 1.0]))


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch, clean_registry):
    """A third-party distribution declaring `[trl_dpo_plus.losses]` is enough: no import by the user."""
    (tmp_path / "my_loss_pkg.py").write_text(
        textwrap.dedent(
            '''
            from trl_dpo_plus.losses import LossOutput, register_loss

            @register_loss("plugin_loss", requires_reference=False, paper="https://example.org/plugin")
            def plugin_loss(batch, *, beta: float = 0.5):
                """Plugin loss.

                Loss: −β·lw
                """
                return LossOutput(-beta * batch.chosen_logps, batch.chosen_logps.detach(), batch.rejected_logps.detach())
            '''
        )
    )
    dist = tmp_path / "my_loss_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-loss-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[trl_dpo_plus.losses]\nplugin_loss = my_loss_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "plugin_loss" not in registry._REGISTRY
    assert "plugin_loss" in list_losses()
    assert get_loss("plugin_loss").paper == "https://example.org/plugin"
    sys.modules.pop("my_loss_pkg", None)


def test_broken_plugin_names_itself(tmp_path, monkeypatch, clean_registry):
    dist = tmp_path / "broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[trl_dpo_plus.losses]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.raises(ImportError, match="plugin 'broken'"):
        list_losses()


def test_every_loss_paper_has_a_bibtex_entry_for_the_model_card():
    from trl_dpo_plus.citations import bibtex

    missing = [n for n in list_losses() if get_loss(n).paper and bibtex(get_loss(n).paper) is None]
    assert not missing, f"add these losses' papers to trl_dpo_plus/citations.py: {missing}"
    assert "Direct Preference Optimization" in bibtex("https://arxiv.org/abs/2305.18290")
