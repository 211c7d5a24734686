import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _cap_onednn_isa_if_bf16_matmul_crashes() -> None:
    """Some machines advertise AMX in cpuid without letting processes use it; oneDNN's bf16 matmul then dies with
    SIGILL (seen on this project's CI machines: the QLoRA tests, which compute in bf16). Probe once in a subprocess
    and, if it dies, cap oneDNN at AVX-512 BF16 for this process and its children (read at oneDNN's first use)."""
    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        return
    probe = (
        "import torch; w = torch.ones(64, 64, dtype=torch.bfloat16, requires_grad=True); "
        "torch.nn.functional.linear(torch.ones(128, 64, dtype=torch.bfloat16), w).sum().backward()"
    )
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0:
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"


_cap_onednn_isa_if_bf16_matmul_crashes()
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


def make_pairs(n: int, seed: int = 0):
    """Small generated preference pairs: a story prompt, a kind ending (chosen) and an unkind one (rejected)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    names = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia"]
    things = ["ball", "cat", "tree", "cake", "boat", "dog"]
    kind = ["shared it with a friend and smiled.", "said thank you and hugged mom.", "helped the little bird home."]
    unkind = ["broke it and ran away.", "was mean and yelled at everyone.", "threw it in the mud"]
    rows = []
    for _ in range(n):
        name, thing = rng.choice(names), rng.choice(things)
        rows.append(
            {
                "prompt": f"Once upon a time, {name} found a {thing}. {name}",
                "chosen": " " + rng.choice(kind) + " " * rng.randint(0, 1) + rng.choice(["", " The end."]),
                "rejected": " " + rng.choice(unkind),
            }
        )
    return Dataset.from_list(rows)


def make_unpaired(n: int, seed: int = 0, desirable_share: float = 0.5):
    """Unpaired rows (KTO): each generated pair's chosen (desirable) or rejected (undesirable) completion, not both."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for row in make_pairs(n, seed=seed):
        good = rng.random() < desirable_share
        rows.append({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"], "label": good})
    return Dataset.from_list(rows)


@pytest.fixture(scope="session")
def stories_path():
    from trl_dpo_plus.assets import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(stories_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """Random-init tiny Llama and Qwen2 models saved to disk (TRL loads the reference copy from the path)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    root = tmp_path_factory.mktemp("tiny_models")
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    # bitsandbytes' 4-bit CPU inference kernel needs in/out features that are multiples of its blocksize (64)
    wide = {**common, "hidden_size": 64, "intermediate_size": 128}
    paths = {}
    configs = {"llama": LlamaConfig(**common), "qwen2": Qwen2Config(**common), "llama64": LlamaConfig(**wide)}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture
def clean_registry():
    """Registrations made by a test are undone after it."""
    from trl_dpo_plus.losses import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
