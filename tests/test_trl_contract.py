"""Fails loudly when the TRL code that DPOPlusTrainer overrides or relies on changes upstream.

If one of these fails after a TRL upgrade: read the new upstream method, port its changes into
`trl_dpo_plus/trainer.py` / `layout.py` (the parity tests then tell whether the port is exact), and update the hash.
"""

import hashlib
import inspect
import re

import pytest
import trl
from trl.trainer import dpo_trainer, kto_trainer

# sha256 (first 16 hex digits) of `inspect.getsource` of each method, TRL 1.16.0
PINNED = {
    "_compute_loss": "5e58a1699e0d76cd",  # overridden by DPOPlusTrainer._compute_loss (+ PaddedPairLayout)
    "compute_ref_log_probs": "90611af9cbadb8ec",  # the padded layout's reference forward; overridden per layout
    "log": "e80e122cfe5fd8ad",  # extended by DPOPlusTrainer.log
    "_precompute_ref_logps": "f2c098c7da6ca701",  # extended: collates precompute batches in the chosen layout
    "_prepare_dataset": "35e349e8e8266df4",  # extended: a clear error when max_length drops every pair
    "_set_signature_columns_if_needed": "71225a628baed4cb",  # extended: keeps the unpaired rows' columns
}
# TRL's KTO data preparation, which DPOPlusTrainer runs on itself for unpaired rows (`_prepare_unpaired`)
KTO_PREPARE_PIN = "d22cf45470e637d6"
# The fused LM head the shared-prefix layout calls with a 4D mask, position_ids and labels
FUSED_HEAD_PIN = "422d009f04b66659"


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@pytest.mark.parametrize("method", sorted(PINNED))
def test_overridden_trl_methods_are_unchanged(method):
    source = inspect.getsource(getattr(dpo_trainer.DPOTrainer, method))
    digest = _digest(source)
    assert digest == PINNED[method], (
        f"trl {trl.__version__} changed DPOTrainer.{method} (hash {digest}, pinned {PINNED[method]}). "
        "DPOPlusTrainer mirrors it: port the upstream change, run the parity tests, then update PINNED."
    )


def test_kto_preparation_is_unchanged_and_reads_what_the_trainer_sets():
    """`_prepare_unpaired` calls TRL's `KTOTrainer._prepare_dataset` with a DPOPlusTrainer as `self`: it must read only
    the attributes the trainer sets (`_tokenizer`, `calculate_KL`, `desirable_weight`, `undesirable_weight`) and
    name its KL column `KL_completion_ids`."""
    source = inspect.getsource(kto_trainer.KTOTrainer._prepare_dataset)
    assert set(re.findall(r"self\.(\w+)", source)) == {"_tokenizer", "calculate_KL", "desirable_weight",
                                                        "undesirable_weight"}
    assert 'examples["KL_completion_ids"]' in source
    digest = _digest(source)
    assert digest == KTO_PREPARE_PIN, (
        f"trl {trl.__version__} changed KTOTrainer._prepare_dataset (hash {digest}): check what it reads from the "
        "trainer and the columns it writes, run tests/test_kto.py, update the pin."
    )


def test_fused_lm_head_is_unchanged_and_compacts_where_the_trainer_says():
    """`DPOPlusTrainer.completion_only_lm_head` patches `trl.trainer.utils._use_triton` to make the fused head score
    only the labelled positions; that works only while the compact decision reads that module-level name."""
    from trl.trainer import utils

    source = inspect.getsource(utils.add_fused_lm_head)
    assert "compact = _use_triton(hidden_states.device)" in source
    digest = _digest(source)
    assert digest == FUSED_HEAD_PIN, (
        f"trl {trl.__version__} changed add_fused_lm_head (hash {digest}): check the shared-prefix layout's use of it "
        "(labels shifted by one, kwargs passed to the backbone, compaction), run tests/test_layout.py, update the pin."
    )


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


def test_trl_version_is_in_the_tested_range():
    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert (major, minor) == (1, 16), f"trl {trl.__version__} is outside the tested range >=1.16,<1.17"


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
