"""Dataset checks run at dataset preparation, before tokenization: clear errors and counted warnings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)

REQUIRED = ("chosen", "rejected")


@dataclass
class PairCounts:
    total: int = 0
    empty_completion: int = 0
    identical: int = 0

    @property
    def degenerate(self) -> int:
        return self.empty_completion + self.identical


def _text(value) -> str:
    """Plain text of a field: the string itself, or the concatenated contents of a conversational message list."""
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content", "")) for m in value)


def _check_field(value, column: str, row: int) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return
    raise TypeError(
        f"Row {row}, column {column!r}: expected a string (or a list of {{'role', 'content'}} messages), got "
        f"{type(value).__name__} {value!r:.80}. Convert the column to text before training."
    )


def check_preference_dataset(dataset, *, name: str = "train", drop_degenerate: bool = False):
    """Validate a prompt/chosen/rejected dataset; count (and optionally drop) empty or identical pairs.

    Raises on a missing column (naming the columns the dataset has), on unpaired KTO-style data, and on non-string
    fields (naming the row). A `datasets.IterableDataset` is checked on its first example only.
    """
    if isinstance(dataset, IterableDataset):
        columns = list(next(iter(dataset)).keys())
    elif isinstance(dataset, Dataset):
        columns = dataset.column_names
    else:
        return dataset  # dicts of datasets are checked one by one by the caller
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        hint = ""
        if {"completion", "label"} <= set(columns):
            hint = " This looks like unpaired (KTO-style) data: pair it into chosen/rejected first."
        raise ValueError(
            f"The {name} dataset has no {' or '.join(repr(c) for c in missing)} column. A preference dataset needs "
            f"'prompt' (optional when chosen/rejected carry it), 'chosen' and 'rejected'; this one has {columns}.{hint}"
        )
    if isinstance(dataset, IterableDataset):
        return dataset

    fields = [c for c in ("prompt", "chosen", "rejected") if c in columns]
    data = dataset.select_columns(fields).to_dict()
    counts = PairCounts(total=len(dataset))
    keep = []
    for row in range(len(dataset)):
        for column in fields:
            _check_field(data[column][row], column, row)
        chosen, rejected = _text(data["chosen"][row]), _text(data["rejected"][row])
        empty = not chosen.strip() or not rejected.strip()
        identical = not empty and chosen.strip() == rejected.strip()
        counts.empty_completion += empty
        counts.identical += identical
        keep.append(not (empty or identical))

    if counts.degenerate:
        action = "dropped" if drop_degenerate else "kept (set drop_degenerate_pairs=True to drop them)"
        logger.warning(
            "%s dataset: %d of %d pairs have an empty completion and %d have chosen == rejected; %s. They give no "
            "preference signal.",
            name, counts.empty_completion, counts.total, counts.identical, action,
        )
        if drop_degenerate:
            dataset = dataset.select([i for i, k in enumerate(keep) if k])
            if len(dataset) == 0:
                raise ValueError(f"Every pair of the {name} dataset was empty or identical; nothing is left to train on")
    return dataset


DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_preference_dataset(name_or_path: str, config: str | None = None, streaming: bool = False):
    """A `DatasetDict` from a local JSON/JSONL/Parquet/CSV file, a folder of them (split = file name before the first
    '-', '_' or '.': `train.jsonl`, `test-00000.parquet`), a folder written by `save_to_disk`, or a Hub dataset id."""
    import re
    from pathlib import Path

    from datasets import load_dataset, load_from_disk

    path = Path(name_or_path).expanduser()
    if path.is_file():
        kind = DATA_FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"Dataset file {path} has an unsupported type; use one of {sorted(DATA_FILE_TYPES)}")
        return load_dataset(kind, data_files={"train": str(path)}, streaming=streaming)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return load_from_disk(str(path))
        files: dict[str, list[str]] = {}
        kinds = set()
        for file in sorted(path.iterdir()):
            if file.suffix.lower() in DATA_FILE_TYPES:
                split = re.split(r"[-_.]", file.name, maxsplit=1)[0]
                files.setdefault(split, []).append(str(file))
                kinds.add(DATA_FILE_TYPES[file.suffix.lower()])
        if not files:
            raise ValueError(f"Dataset folder {path} holds no {'/'.join(sorted(DATA_FILE_TYPES))} files")
        if len(kinds) > 1:
            raise ValueError(f"Dataset folder {path} mixes file types {sorted(kinds)}; keep one type per folder")
        return load_dataset(kinds.pop(), data_files=files, streaming=streaming)
    # A Hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path
    looks_local = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
                   or path.suffix.lower() in DATA_FILE_TYPES)
    if looks_local:
        raise FileNotFoundError(f"Dataset path {name_or_path!r} does not exist")
    return load_dataset(name_or_path, name=config, streaming=streaming)
