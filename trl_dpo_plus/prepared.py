"""The splits after TRL's tokenization: token ids checked against the model, rows dropped or truncated counted, and a
clear error when `max_length` leaves nothing of a split.

Every function takes the prepared datasets and settings as arguments; the truncation rule itself is
`trl_dpo_plus.layout.truncation`.
"""

from __future__ import annotations

import copy
import logging

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from .layout.truncation import is_truncated

logger = logging.getLogger(__name__)


def without_filter(args):
    """A copy of `args` under which TRL's preparation keeps every row: its DPO and KTO preparations read `max_length`
    only to drop rows whose prompt alone fills it."""
    args = copy.copy(args)
    args.max_length = None
    return args


def _size(dataset) -> int | None:
    """Rows of a map-style dataset before TRL prepares it; `None` for streamed data."""
    return len(dataset) if isinstance(dataset, Dataset) else None


def _splits(train_dataset, eval_dataset) -> dict:
    splits = {"train": train_dataset}
    if isinstance(eval_dataset, dict):
        splits.update(eval_dataset)
    elif eval_dataset is not None:
        splits["eval"] = eval_dataset
    return splits


def split_sizes(train_dataset, eval_dataset) -> dict[str, int | None]:
    """Rows per split before preparation (`None` for streamed or absent splits), as the counts compare them."""
    sizes = {name: _size(dataset) for name, dataset in _splits(train_dataset, eval_dataset).items()}
    sizes.setdefault("eval", None)
    return sizes


def token_id_tables(train_dataset, eval_dataset, columns: tuple[str, ...]) -> dict[str, pa.Table]:
    """Per prepared map-style split, its token-id `columns` as one Arrow table, read once through TRL's filter's
    indices (streamed splits are not known up front)."""
    return {name: ds.select_columns(list(columns)).with_format("arrow")[:]
            for name, ds in _splits(train_dataset, eval_dataset).items()
            if isinstance(ds, Dataset) and "prompt_ids" in ds.column_names}


def check_token_ids(tables: dict[str, pa.Table], embedding_rows: int, tokenizer) -> None:
    """Token ids the model's embedding has no row for (a tokenizer with added tokens and no resize) fail here, at
    preparation, naming the token and the fix, not with an IndexError at step 1."""
    for name, table in tables.items():
        for column in table.column_names:
            values = pc.list_flatten(table.column(column))
            if len(values) == 0:
                continue
            top = pc.max(values).as_py()
            if top is not None and top >= embedding_rows:
                token = tokenizer.convert_ids_to_tokens(int(top))
                raise ValueError(
                    f"The {name} dataset has token id {top} ({token!r}) in {column!r}, but the model's embedding has "
                    f"{embedding_rows} rows (ids 0..{embedding_rows - 1}). The tokenizer has tokens the model does not: "
                    "call model.resize_token_embeddings(len(tokenizer)) before training, or use the model's own "
                    "tokenizer."
                )


def count_truncation(raw_sizes: dict[str, int | None], tables: dict[str, pa.Table], kind, max_length: int | None,
                     mode: str) -> dict[str, dict[str, int]]:
    """Per split: rows kept, rows TRL's preparation dropped (prompt alone fills `max_length` under `keep_start`), and
    kept rows that `max_length` truncates; one warning per split that loses anything."""
    counts = {}
    for name, table in tables.items():
        if raw_sizes.get(name) is None:
            continue
        lengths = [pc.list_value_length(table.column(c)).to_numpy() for c in kind.token_columns]
        truncated = int(is_truncated(lengths[0], kind.longest_completion(lengths), max_length).sum())
        dropped = raw_sizes[name] - table.num_rows
        counts[name] = {"pairs": table.num_rows, "dropped": dropped, "truncated": truncated}
        if not (dropped or truncated):
            continue
        unit = kind.unit
        what = "with their prompt cut at the start" if mode == "keep_completions" else "truncated"
        message = f"{name} dataset, max_length={max_length}: {truncated} of {table.num_rows} {unit} {what}"
        if dropped:
            message += (f"; {dropped} of {raw_sizes[name]} {unit} dropped because the prompt alone fills max_length. "
                        f"truncation_mode='keep_completions' keeps every {unit[:-1]} (it cuts the prompt's start, "
                        "identically for both completions); a larger max_length keeps more")
        logger.warning(message)
    return counts


def check_rows_left(dataset, prepared, dataset_name: str, max_length: int | None, unit: str, prompt_lengths) -> None:
    """When `max_length` left nothing of a non-empty split, a clear error instead of `num_samples=0` at the first step
    (or an evaluation on nothing). `prompt_lengths()` gives the prompts' token counts, prepared without the filter."""
    if not (isinstance(prepared, Dataset) and len(prepared) == 0 and isinstance(dataset, Dataset) and len(dataset) > 0):
        return
    lengths = sorted(prompt_lengths())
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    raise ValueError(
        f"Every one of the {len(dataset)} {unit} of the {dataset_name} dataset was dropped: its prompt alone fills "
        f"max_length={max_length} tokens (prompt length p10/p50/p90/max: {pick(0.1)}/{pick(0.5)}/{pick(0.9)}/"
        f"{lengths[-1]}). Raise max_length above the prompt lengths, or set truncation_mode='keep_completions' to cut "
        "the prompt's start instead."
    )


def check_prepared(train_dataset, eval_dataset, raw_sizes: dict[str, int | None], kind, args, model,
                   tokenizer) -> dict[str, dict[str, int]]:
    """The prepared map-style splits read once: token ids checked against `model`'s embedding, and the rows dropped
    and truncated per split counted (returned, see `count_truncation`)."""
    tables = token_id_tables(train_dataset, eval_dataset, kind.token_columns)
    counts = count_truncation(raw_sizes, tables, kind, args.max_length, args.truncation_mode)
    embeddings = model.get_input_embeddings()
    check_token_ids(tables, getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0], tokenizer)
    return counts
