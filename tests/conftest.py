import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless"


@pytest.fixture
def hh_rlhf_dir():
    if not (HH_RLHF / "train.jsonl").exists():
        pytest.skip(f"needs the real HH-RLHF subset at {HH_RLHF} (../shared/data beside the checkout); not present")
    return HH_RLHF
