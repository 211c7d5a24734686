"""Dataset checks run at dataset preparation, before tokenization: clear errors and counted warnings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)

REQUIRED = {"paired": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}
TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


def data_kind_of(columns) -> str | None:
    """`"paired"` for chosen/rejected columns, `"unpaired"` for completion/label columns, else `None`."""
    if {"chosen", "rejected"} <= set(columns):
        return "paired"
    if {"completion", "label"} <= set(columns):
        return "unpaired"
    return None


@dataclass
class PairCounts:
    total: int = 0
    empty_completion: int = 0
    identical: int = 0

    @property
    def degenerate(self) -> int:
        return self.empty_completion + self.identical


ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(value) -> str:
    """Plain text of a field: the string itself, or the concatenated contents of a conversational message list (a
    tool-call turn counts by its calls)."""
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content") or "") + (str(m["tool_calls"]) if m.get("tool_calls") else "") for m in value)


def _check_field(value, column: str, row: int) -> None:
    """A string, or a list of messages as TRL takes them: a known role, and string content (or `None`/absent content
    on a turn that carries `tool_calls`)."""
    def fail(problem: str, fix: str, error=ValueError):
        raise error(f"Row {row}, column {column!r}: {problem}. {fix}")

    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        fail(f"expected a string or a non-empty list of messages, got {type(value).__name__} {value!r:.80}",
             "Convert the column to text (or to [{'role': ..., 'content': ...}] messages) before training.", TypeError)
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message:
            fail(f"message {i} is {message!r:.80}, not a {{'role', 'content'}} mapping",
                 "Each message needs a 'role' and a 'content'.")
        if message["role"] not in ROLES:
            fail(f"message {i} has the unknown role {message['role']!r}", f"Use one of {list(ROLES)}.")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            fail(f"message {i} ({message['role']}) has no content",
                 "Give it a 'content' string (it may be empty), or 'tool_calls' for a tool-call turn.")
        if content is not None and not isinstance(content, (str, list)):
            fail(f"message {i} has content of type {type(content).__name__}", "Content must be a string.")


def check_row(example: dict, row: int, name: str = "train") -> None:
    """The checks on one row: each field's type and messages, a bool label on unpaired rows, and one format (plain
    text or conversational) for all."""
    fields = [c for c in TEXT_FIELDS if c in example]
    for column in fields:
        _check_field(example[column], f"{name}:{column}" if name != "train" else column, row)
    unpaired = "completion" in example and not {"chosen", "rejected"} <= set(example)  # a pair's own `label` is data
    if unpaired and "label" in example and not (isinstance(example["label"], bool) or example["label"] in (0, 1)):
        raise TypeError(
            f"Row {row}, column {'label' if name == 'train' else f'{name}:label'!r}: {example['label']!r} is not a bool. "
            "Label each completion True (desirable, thumbs up) or False (undesirable), e.g. "
            "dataset.map(lambda row: {'label': row['label'] == 'good'})."
        )
    kinds = {c: "conversational" if isinstance(example[c], list) else "text" for c in fields}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"Row {row} mixes formats: {kinds}. Use plain strings for all of {'/'.join(fields)}, or message lists "
            "for all (a conversational prompt needs conversational completions)."
        )


def _check_streamed(dataset: IterableDataset, name: str) -> IterableDataset:
    """Rows of a streamed dataset are checked as they stream, with the same errors (naming the row)."""
    def check(example, index):
        check_row(example, index, name)
        return example

    return dataset.map(check, with_indices=True)


def _kind_mismatch(name: str, found: str, losses: list[str] | None) -> str:
    from .losses import DATA_KINDS

    what = f"loss_type={losses}" if losses else "this loss"
    if found == "paired":
        fix = ("Turn each pair into two unpaired rows (chosen → desirable, rejected → undesirable) with "
               "trl_dpo_plus.unpair_preference_dataset(dataset) (on the command line: --unpair), or use 'kto_pair', "
               "KTO on pairs.")
    else:
        fix = ("Use loss_type='kto' or 'apo_zero_unpaired', which train on unpaired rows, or build "
               "prompt/chosen/rejected pairs from completions of the same prompt.")
    expected = "unpaired" if found == "paired" else "paired"
    return (f"The {name} dataset holds {DATA_KINDS[found]}, but {what} trains on {DATA_KINDS[expected]}. {fix}")


def check_preference_dataset(dataset, *, name: str = "train", drop_degenerate: bool = False, kind: str = "paired",
                             losses: list[str] | None = None, unpair: bool = False, seed: int = 0):
    """Validate a preference dataset of the given `kind`; count (and optionally drop) degenerate rows.

    `kind="paired"`: prompt/chosen/rejected rows; empty or identical pairs are degenerate. `kind="unpaired"`:
    prompt/completion/label rows (KTO-style thumbs up/down); an empty completion is degenerate. Raises on an empty
    dataset, data of the other kind (naming the conversion), a missing column (naming the columns the dataset has),
    non-string fields, non-bool labels, malformed messages and mixed formats (naming the row). A
    `datasets.IterableDataset` is checked row by row as it streams. With `unpair=True`, paired data given for
    `kind="unpaired"` is first turned into unpaired rows (`unpair_preference_dataset` with `seed`).
    """
    if isinstance(dataset, IterableDataset):
        try:
            columns = list(next(iter(dataset)).keys())
        except StopIteration:
            raise ValueError(f"The {name} dataset is empty: it yields no rows. Check the data files and split.") from None
    elif isinstance(dataset, Dataset):
        if len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty (0 rows). Check the data files, the split and any filter.")
        columns = dataset.column_names
    else:
        return dataset  # dicts of datasets are checked one by one by the caller
    found = data_kind_of(columns)
    if unpair and kind == "unpaired" and found == "paired":
        dataset = unpair_preference_dataset(dataset, seed=seed)
        logger.info("%s dataset: each pair turned into a desirable (chosen) and an undesirable (rejected) row", name)
        columns = dataset.column_names if isinstance(dataset, Dataset) else list(next(iter(dataset)).keys())
        found = "unpaired"
    if found is not None and found != kind:
        raise ValueError(_kind_mismatch(name, found, losses))
    missing = [c for c in REQUIRED[kind] if c not in columns]
    if missing:
        needs = ("A preference dataset needs 'prompt' (optional when chosen/rejected carry it), 'chosen' and "
                 "'rejected'" if kind == "paired" else
                 "An unpaired dataset needs 'prompt', 'completion' and 'label' (True for a desirable completion)")
        raise ValueError(f"The {name} dataset has no {' or '.join(repr(c) for c in missing)} column. {needs}; this one "
                         f"has {columns}.")
    if isinstance(dataset, IterableDataset):
        return _check_streamed(dataset, name)

    fields = [c for c in (*TEXT_FIELDS, "label") if c in columns]
    data = dataset.select_columns(fields).to_dict()
    counts = PairCounts(total=len(dataset))
    keep = []
    for row in range(len(dataset)):
        check_row({c: data[c][row] for c in fields}, row, name)
        completions = [_text(data[c][row]).strip() for c in ("chosen", "rejected", "completion") if c in data]
        empty = not all(completions)
        identical = not empty and len(completions) == 2 and completions[0] == completions[1]
        counts.empty_completion += empty
        counts.identical += identical
        keep.append(not (empty or identical))

    if counts.degenerate:
        action = "dropped" if drop_degenerate else "kept (set drop_degenerate_pairs=True to drop them)"
        if kind == "paired":
            logger.warning(
                "%s dataset: %d of %d pairs have an empty completion and %d have chosen == rejected; %s. They give no "
                "preference signal.",
                name, counts.empty_completion, counts.total, counts.identical, action,
            )
        else:
            logger.warning("%s dataset: %d of %d rows have an empty completion; %s. They give no signal.",
                           name, counts.empty_completion, counts.total, action)
        if drop_degenerate:
            dataset = dataset.select([i for i, k in enumerate(keep) if k])
            if len(dataset) == 0:
                raise ValueError(f"Every row of the {name} dataset was empty or identical; nothing is left to train on")
    return dataset


def check_trainer_datasets(train_dataset, eval_dataset, args):
    """The trainer's train and eval datasets (a dict of eval datasets too), checked on the raw text for the kind of
    data `args.loss_type` trains on, before TRL tokenizes them and before any model is loaded."""
    def check(dataset, name):
        if dataset is None:
            return None
        return check_preference_dataset(dataset, name=name, drop_degenerate=args.drop_degenerate_pairs,
                                        kind=args.data_kind, losses=list(args.loss_type), unpair=args.unpair,
                                        seed=args.seed if getattr(args, "unpair_shuffle", True) else None)

    train_dataset, eval_dataset = drop_empty_image_column(train_dataset), drop_empty_image_column(eval_dataset)
    if isinstance(eval_dataset, dict):
        return check(train_dataset, "train"), {key: check(ds, key) for key, ds in eval_dataset.items()}
    return check(train_dataset, "train"), check(eval_dataset, "eval")


def drop_empty_image_column(dataset):
    """A text dataset whose `image`/`images` column holds only `None` (e.g. after concatenating with a vision set)
    without that column: TRL reads any such column as vision data and refuses a text model."""
    from datasets import Dataset

    if isinstance(dataset, dict):
        return {key: drop_empty_image_column(ds) for key, ds in dataset.items()}
    if not isinstance(dataset, Dataset):
        return dataset
    empty = [c for c in ("image", "images") if c in dataset.column_names
             and all(v is None or v == [] for v in dataset.with_format("arrow")[c].to_pylist())]
    if empty:
        logger.info("Dropping the %s column%s: every row holds None (text data)", "/".join(empty), "s" * (len(empty) > 1))
        dataset = dataset.remove_columns(empty)
    return dataset


def check_model_path(model) -> None:
    """A model given as a path that does not exist fails before anything loads, with the fix."""
    import os

    if isinstance(model, str) and looks_like_local_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise FileNotFoundError(
            f"Model path {model!r} does not exist. Give an existing local folder, or a Hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct'."
        )


def unpair_preference_dataset(dataset, *, seed: int | None = 0):
    """Paired rows (prompt, chosen, rejected) -> unpaired rows (prompt, completion, label): each chosen completion
    becomes a desirable row (`label=True`), each rejected one an undesirable row (`label=False`), other columns copied
    to both. So `kto` can train on the same data as `kto_pair` and the paired losses.

    Works on a `Dataset`, `DatasetDict`, `IterableDataset` or `IterableDatasetDict`; a dataset without a `prompt` column
    has it extracted from chosen/rejected first (the common prefix, as TRL does). The rows are shuffled with `seed`
    (an `IterableDataset` through a 1000-row buffer): `kto` reads rows in order and takes each row's KL completion
    from its neighbour, so the two completions of one pair should not sit side by side, and each batch should hold
    both labels. `seed=None` keeps TRL's order (within each block of 1000 pairs, the chosen rows, then the rejected).
    """
    from datasets import DatasetDict, IterableDatasetDict
    from trl.data_utils import maybe_extract_prompt
    from trl.data_utils import unpair_preference_dataset as trl_unpair

    first = next(iter(dataset.values())) if isinstance(dataset, (DatasetDict, IterableDatasetDict)) else dataset
    columns = first.column_names if first.column_names is not None else list(next(iter(first)).keys())
    if data_kind_of(columns) != "paired":
        raise ValueError(f"unpair_preference_dataset needs 'chosen' and 'rejected' columns; this dataset has {columns}")
    if "prompt" not in columns:
        dataset = dataset.map(maybe_extract_prompt)
    unpaired = trl_unpair(dataset)
    if seed is None:
        return unpaired
    if isinstance(unpaired, (DatasetDict, IterableDatasetDict)):
        return type(unpaired)({k: _shuffle(v, seed) for k, v in unpaired.items()})
    return _shuffle(unpaired, seed)


def _shuffle(dataset, seed: int):
    if isinstance(dataset, IterableDataset):
        return dataset.shuffle(seed=seed, buffer_size=1000)
    return dataset.shuffle(seed=seed).flatten_indices()


def looks_like_local_path(name: str) -> bool:
    """A Hub id is "name" or "org/name"; a name that starts with / . ~ or has more than one slash is a local path
    (and, if it does not exist, a mistyped one)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_preference_dataset(name_or_path: str, config: str | None = None, streaming: bool = False):
    """A `DatasetDict` exactly as `datasets` sees it: a folder written by `save_to_disk` goes to `load_from_disk`; a
    folder of data files (a downloaded Hub snapshot with its `README.md` configs and `data/<split>-00000-of-00001.parquet`
    shards, or `train.jsonl`/`test.jsonl`) and a Hub id go to `load_dataset`, with its own split rules (custom names
    like UltraFeedback's `train_prefs` included). A single JSON/JSONL/Parquet/CSV file is the `train` split."""
    from pathlib import Path

    from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk

    path = Path(name_or_path).expanduser()
    if path.is_file():
        kind = DATA_FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"Dataset file {path} has an unsupported type; use one of {sorted(DATA_FILE_TYPES)}, or "
                             "a folder or Hub id that datasets.load_dataset reads")
        return load_dataset(kind, data_files={"train": str(path)}, streaming=streaming)
    if path.is_dir() and any((path / marker).exists() for marker in ("dataset_dict.json", "state.json")):
        saved = load_from_disk(str(path))
        saved = saved if isinstance(saved, DatasetDict) else DatasetDict({"train": saved})
        return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in saved.items()}) if streaming else saved
    if not path.is_dir() and (looks_like_local_path(name_or_path) or path.suffix.lower() in DATA_FILE_TYPES):
        raise FileNotFoundError(f"Dataset path {name_or_path!r} does not exist")
    try:
        return load_dataset(str(path) if path.is_dir() else name_or_path, name=config, streaming=streaming)
    except (FileNotFoundError, ValueError) as err:  # datasets' own message, with what we were asked to read
        where = f"folder {path}" if path.is_dir() else f"{name_or_path!r}"
        raise ValueError(f"datasets.load_dataset could not read the {where}: {err}") from err
