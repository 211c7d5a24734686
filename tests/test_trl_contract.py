"""Fails loudly when the TRL code that DPOPlusTrainer overrides or relies on changes upstream.

If one of these fails after a TRL upgrade: read the new upstream method, port its changes into
`trl_dpo_plus/trainer.py` / `layout.py` (the parity tests then tell whether the port is exact), and update the hash.
"""

import hashlib
import inspect

import pytest
import trl
from trl.trainer import dpo_trainer

# sha256 (first 16 hex digits) of `inspect.getsource` of each method, TRL 1.16.0
PINNED = {
    "_compute_loss": "5e58a1699e0d76cd",  # overridden by DPOPlusTrainer._compute_loss (+ PaddedPairLayout)
    "compute_ref_log_probs": "90611af9cbadb8ec",  # called for every reference forward
    "log": "e80e122cfe5fd8ad",  # extended by DPOPlusTrainer.log
}


@pytest.mark.parametrize("method", sorted(PINNED))
def test_overridden_trl_methods_are_unchanged(method):
    source = inspect.getsource(getattr(dpo_trainer.DPOTrainer, method))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == PINNED[method], (
        f"trl {trl.__version__} changed DPOTrainer.{method} (hash {digest}, pinned {PINNED[method]}). "
        "DPOPlusTrainer mirrors it: port the upstream change, run the parity tests, then update PINNED."
    )


def test_reference_model_is_built_with_create_model_from_path():
    """The reference-free path intercepts this call in DPOTrainer.__init__."""
    source = inspect.getsource(dpo_trainer.DPOTrainer.__init__)
    assert "self.ref_model = create_model_from_path(ref_model_path, **ref_model_init_kwargs)" in source
    assert "model = create_model_from_path(model, **model_init_kwargs)" in source
    assert source.index("model = create_model_from_path(model") < source.index("self.ref_model = create_model_from_path")


def test_trl_version_is_in_the_tested_range():
    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert (major, minor) == (1, 16), f"trl {trl.__version__} is outside the tested range >=1.16,<1.17"
