"""Fails loudly when the TRL code that DPOPlusTrainer overrides or relies on changes upstream.

If one of these fails after a TRL upgrade: read the new upstream method, port its changes into
`trl_dpo_plus/trainer.py` / `layout.py` (the parity tests then tell whether the port is exact), and update the hash.
"""

import inspect
import re

import pytest
import trl
from trl.trainer import dpo_trainer, kto_trainer

from trl_dpo_plus.contract import PINS, check_trl_contract, source_digest


@pytest.mark.parametrize("name", sorted(PINS))
def test_relied_on_trl_code_is_unchanged(name):
    module, qualname, pinned, use = PINS[name]
    digest = source_digest(module, qualname)
    assert digest == pinned, (
        f"trl {trl.__version__} changed {name} (hash {digest}, pinned {pinned}; {use}). Port the upstream change, "
        "run the parity and layout tests, then update trl_dpo_plus/contract.py."
    )


def test_a_changed_upstream_method_fails_when_the_trainer_is_built(tiny_models, tokenizer, tmp_path, monkeypatch):
    from conftest import make_pairs
    from trl_dpo_plus import DPOConfig, DPOTrainer

    monkeypatch.setitem(PINS, "DPOTrainer._compute_loss", (*PINS["DPOTrainer._compute_loss"][:2], "0" * 16,
                                                            "overridden by DPOPlusTrainer._compute_loss"))
    check_trl_contract.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"changed code trl-dpo-plus relies on: DPOTrainer._compute_loss.*"
                                               r"tested with trl 1.16.x.*pip install 'trl>=1.16,<1.17'"):
            DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), report_to=[]),
                       train_dataset=make_pairs(4), processing_class=tokenizer)
    finally:
        check_trl_contract.cache_clear()


def test_an_untested_trl_with_unchanged_code_runs_with_one_info_line(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(trl, "__version__", "1.19.0")
    check_trl_contract.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
            check_trl_contract()
    finally:
        check_trl_contract.cache_clear()
    assert "trl 1.19.0 is not the tested 1.16.x, but the 8 TRL methods trl-dpo-plus relies on are unchanged" in caplog.text


def test_kto_preparation_is_unchanged_and_reads_what_the_trainer_sets():
    """`_prepare_unpaired` calls TRL's `KTOTrainer._prepare_dataset` with a DPOPlusTrainer as `self`: it must read only
    the attributes the trainer sets (`_tokenizer`, `calculate_KL`, `desirable_weight`, `undesirable_weight`) and
    name its KL column `KL_completion_ids`."""
    source = inspect.getsource(kto_trainer.KTOTrainer._prepare_dataset)
    assert set(re.findall(r"self\.(\w+)", source)) == {"_tokenizer", "calculate_KL", "desirable_weight",
                                                        "undesirable_weight"}
    assert 'examples["KL_completion_ids"]' in source


def test_fused_lm_head_is_unchanged_and_compacts_where_the_trainer_says():
    """`DPOPlusTrainer.completion_only_lm_head` patches `trl.trainer.utils._use_triton` to make the fused head score
    only the labelled positions; that works only while the compact decision reads that module-level name."""
    from trl.trainer import utils

    source = inspect.getsource(utils.add_fused_lm_head)
    assert "compact = _use_triton(hidden_states.device)" in source


def test_data_collator_is_set_where_the_layout_replaces_it():
    """The layout installs its collator after TRL's __init__ (and before TRL's precompute): TRL must still build its
    own collator only when none was passed, and precompute through `self.data_collator`."""
    init = inspect.getsource(dpo_trainer.DPOTrainer.__init__)
    assert "if data_collator is None:" in init and "self._precompute_ref_logps(" in init
    assert "collate_fn=self.data_collator" in inspect.getsource(dpo_trainer.DPOTrainer._precompute_ref_logps)


def test_reference_model_is_built_with_create_model_from_path():
    """The reference-free path intercepts this call in DPOTrainer.__init__."""
    source = inspect.getsource(dpo_trainer.DPOTrainer.__init__)
    assert "self.ref_model = create_model_from_path(ref_model_path, **ref_model_init_kwargs)" in source
    assert "model = create_model_from_path(model, **model_init_kwargs)" in source
    assert source.index("model = create_model_from_path(model") < source.index("self.ref_model = create_model_from_path")


def test_trl_version_is_the_one_ci_tests():
    """CI runs the suite on the tested TRL (the installable range is wider: `contract.check_trl_contract`)."""
    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert f"{major}.{minor}" == "1.16", f"trl {trl.__version__}: the pins in trl_dpo_plus/contract.py are 1.16.0's"


def test_transformers_callback_state_restore_is_unchanged():
    """DPOPlusTrainer._load_callback_state restores the diagnostics' state in place after Transformers' own restore."""
    import transformers
    from transformers import Trainer

    # transformers is not range-pinned, so this checks the structure; tests/test_resume.py checks the behaviour
    source = inspect.getsource(Trainer._load_callback_state)
    assert "restore_callback_states_from_checkpoint" in source and "stateful_callbacks" in source, transformers.__version__
    assert "self._load_callback_state()" in inspect.getsource(transformers.trainer), transformers.__version__


def test_trl_checks_exo_pair_on_the_config_label_smoothing():
    """`DPOPlusTrainer._exo_pair_checked_at_its_epsilon` hands TRL's `__init__` the ε the registry's exo_pair runs
    with, through `args.label_smoothing`, for TRL's check that refuses 0."""
    source = inspect.getsource(dpo_trainer.DPOTrainer.__init__)
    assert "self.label_smoothing = args.label_smoothing" in source
    assert '"exo_pair" in self.loss_types and self.label_smoothing == 0.0' in source


def test_transformers_checkpoint_save_is_the_seam_the_full_disk_message_wraps():
    """`DPOPlusTrainer._save_checkpoint` wraps Transformers' private `_save_checkpoint(model, trial)`, which the
    training loop calls for every checkpoint; tests/test_saving.py checks the behaviour."""
    import transformers
    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert "self._save_checkpoint(model, trial" in inspect.getsource(transformers.trainer), transformers.__version__
