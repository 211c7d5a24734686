"""Files shipped inside the package: the embedded default model (stories260K, MIT; see its README and LICENSE)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL = ASSETS / "stories260K"
EMBEDDED_MODEL = "trl-dpo-plus:stories260K"  # its alias on the command line: not a Hub id (":" is not allowed there)


def default_model_path() -> str:
    """Path of the embedded stories260K Llama (260K params, TinyStories, MIT), a real pretrained model for offline runs."""
    return str(DEFAULT_MODEL)
