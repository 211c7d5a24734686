"""Reference log-probs computed once and kept on disk, keyed by what they depend on.

With `precompute_ref_log_probs`, TRL runs the reference model once over a dataset before training. A sweep over k
losses (or a later run on the same data) pays that pass again each time. `ReferenceCache` writes each split's
reference log-probs to `<directory>/ref-logps-<fingerprint>.safetensors`, where the fingerprint hashes everything the
numbers depend on:

- `reference_weights`: the reference model's weights (for a PEFT model, its base without the adapter, which is the
  reference TRL uses; so every LoRA run on one base shares the entry);
- `tokenizer`: its vocabulary, special tokens and chat template;
- `dataset`: the prepared token ids of every row (so also the prompt template and the row order);
- `truncation`: `max_length` and `truncation_mode`;
- `layout`: the pair layout and the precision of the forward;
- `reduction`: how per-token log-probs are summed (LD-DPO's `ld_alpha`).

The file name is only an index: each file holds its fingerprint and a checksum of its values, and both are checked on
load, so a renamed, foreign, truncated or damaged file is never read as a hit. A file whose fingerprint, checksum and
values check out is read back and no reference forward runs; any other entry is recomputed and replaced, with one log
line saying why. Non-finite reference log-probs are never written or read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, concatenate_datasets

logger = logging.getLogger(__name__)

COMPONENTS = ("reference_weights", "tokenizer", "dataset", "truncation", "layout", "reduction")
_ADAPTER_KEY_PARTS = ("lora_", ".modules_to_save.", "lora_magnitude_vector")


def _sha(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.view(torch.uint8)
    return memoryview(tensor.numpy()).cast("B")


def weights_fingerprint(model: torch.nn.Module, keep_adapters: bool = False) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes, values).

    For the base of a PEFT model (`keep_adapters=False`), adapter weights are left out and PEFT's wrapper names
    (`base_layer`, `original_module`) are read as the plain model's, so a LoRA model's reference fingerprint equals its
    base model's."""
    digest = hashlib.sha256()
    if not keep_adapters and hasattr(model, "get_base_model"):
        model = model.get_base_model()  # a PEFT model's base, under the plain model's names
    for name, tensor in sorted(model.state_dict().items()):
        if not keep_adapters:
            if any(part in name for part in _ADAPTER_KEY_PARTS):
                continue
            name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if not torch.is_tensor(tensor) or tensor.device.type == "meta":
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary and rules, special tokens and chat template."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps({"map": getattr(tokenizer, "special_tokens_map", {}), "pad": tokenizer.pad_token_id,
                          "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}, sort_keys=True, default=str)
    return _sha(type(tokenizer).__name__, rules, special, str(getattr(tokenizer, "chat_template", None)))


def token_ids_fingerprint(table: pa.Table) -> str:
    """SHA-256 of the token-id columns of a prepared split, row by row (so the row order counts)."""
    digest = hashlib.sha256(str(table.num_rows).encode())
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.int64()))
        digest.update(name.encode())
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """The hashes a cached entry was computed for; `key` names the file."""

    components: dict[str, str]

    @property
    def key(self) -> str:
        return _sha(json.dumps(self.components, sort_keys=True))[:20]

    def differences(self, other: "Fingerprint") -> list[str]:
        return [name for name in COMPONENTS if self.components.get(name) != other.components.get(name)]


class ReferenceCache:
    """A directory of reference log-probs, one safetensors file per (split, fingerprint)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, fingerprint: Fingerprint) -> Path:
        return self.directory / f"ref-logps-{fingerprint.key}.safetensors"

    def entries(self) -> list[tuple[Path, dict]]:
        """`(path, metadata)` of every entry in the directory."""
        from safetensors import safe_open

        found = []
        for path in sorted(self.directory.glob("ref-logps-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    found.append((path, handle.metadata() or {}))
            except Exception as err:  # a partial write or another tool's file: never read as a cache hit
                logger.debug("Ignoring unreadable reference cache file %s (%s)", path, err)
        return found

    def load(self, fingerprint: Fingerprint, rows: int) -> dict[str, torch.Tensor] | None:
        """The cached `{"chosen": ..., "rejected": ...}` for exactly this fingerprint, or `None` (no entry, or one
        that fails its checks: it is then recomputed and replaced, as the log line says)."""
        from safetensors import safe_open

        path = self.path(fingerprint)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in ("chosen", "rejected")}
        except Exception as err:  # truncated, empty, or not a safetensors file
            logger.warning("Reference cache %s is damaged (%s: %s): recomputing and replacing it", path,
                           type(err).__name__, str(err)[:120])
            return None
        problem = _entry_problem(metadata, tensors, fingerprint, rows)
        if problem is not None:
            logger.warning("Reference cache %s %s: recomputing and replacing it", path, problem)
            return None
        return tensors

    def closest(self, fingerprint: Fingerprint, split: str) -> tuple[Path, list[str]] | None:
        """The entry cached for a split of the same name, with the components that differ from `fingerprint`."""
        best = None
        for path, meta in self.entries():
            if meta.get("split") != split or "components" not in meta:
                continue
            differences = fingerprint.differences(Fingerprint(json.loads(meta["components"])))
            if best is None or len(differences) < len(best[1]):
                best = (path, differences)
        return best

    def save(self, fingerprint: Fingerprint, split: str, chosen: torch.Tensor, rejected: torch.Tensor) -> Path:
        """Write one entry with its fingerprint and checksum (atomically: a crash leaves no half file under the final
        name). Non-finite values are refused: a reference that gives NaN would train every later run on NaN."""
        from safetensors.torch import save_file

        tensors = {"chosen": chosen.float().contiguous(), "rejected": rejected.float().contiguous()}
        bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors.values())
        if bad:
            raise ValueError(f"The reference log-probs of the {split} split hold {bad} non-finite values (NaN/inf): "
                             "the reference model's forward is broken (NaN weights, or an overflow in half precision). "
                             "Nothing was cached; check the reference model, or train in float32.")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(fingerprint)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        metadata = {"split": split, "rows": str(chosen.shape[0]), "components": json.dumps(fingerprint.components),
                    "fingerprint": fingerprint.key, "checksum": _checksum(tensors)}
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
        return path

    def check_writable(self) -> None:
        """Raise before the reference pass, not after it, when the directory cannot take an entry."""
        probe = self.directory / f".write-check-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"reference_cache_dir={str(self.directory)!r} is not writable ({err.strerror or err}): "
                             "point reference_cache_dir at a folder you can write to, or drop it.") from err


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    return _sha(*(_tensor_bytes(tensors[key]) for key in ("chosen", "rejected")))


def _entry_problem(metadata: dict, tensors: dict[str, torch.Tensor], fingerprint: Fingerprint, rows: int) -> str | None:
    """Why a readable cache entry cannot be used for `fingerprint`, or `None` when it can."""
    if "components" not in metadata or "checksum" not in metadata:
        return "has no fingerprint or checksum inside (written by another tool or an older version)"
    differences = fingerprint.differences(Fingerprint(json.loads(metadata["components"])))
    if differences:
        return f"was computed for another {', '.join(differences)} (its file name does not match its content)"
    if metadata["checksum"] != _checksum(tensors):
        return "fails its checksum (the values were changed after writing)"
    if any(tensor.shape != (rows,) for tensor in tensors.values()):
        return f"holds {tensors['chosen'].shape[0]} rows, the split has {rows}"
    if not all(torch.isfinite(tensor).all() for tensor in tensors.values()):
        return "holds non-finite values"
    return None


def run_settings(args, layout, accelerator) -> dict[str, str]:
    """The fingerprint's components besides the weights, tokenizer and data: `truncation`, `layout` (with the
    forward's precision) and `reduction` (every setting that changes a cached value is one of them)."""
    precision = f"bf16={args.bf16},fp16={args.fp16},mixed_precision={accelerator.mixed_precision}"
    return {"truncation": f"max_length={args.max_length},truncation_mode={args.truncation_mode}",
            "layout": f"{type(layout).__name__},{precision}", "reduction": f"ld_alpha={args.ld_alpha}"}


class SplitFingerprints:
    """The fingerprints of one run's prepared splits: the reference weights and the tokenizer hashed once for all.

    Args:
        reference: the reference model, unwrapped: the separate reference model, or else the policy itself before
            training (for a PEFT policy, its base is the reference unless it has a 'ref' adapter).
        separate: whether `reference` is a separate reference model (its adapters, if any, count).
        tokenizer: the run's tokenizer (or processor).
        settings: the other components, as text: `truncation`, `layout`.
        broadcast: `broadcast_object_list`, so that every process uses rank 0's fingerprint.
        sharded: the weights are sharded across processes (ZeRO-3), so they cannot be hashed: refused.
    """

    def __init__(self, reference: torch.nn.Module, *, separate: bool, tokenizer, settings: dict[str, str],
                 broadcast: Callable | None = None, sharded: bool = False):
        if sharded:
            raise ValueError("reference_cache_dir cannot fingerprint a ZeRO-3 model (its weights are sharded across "
                             "processes). Drop reference_cache_dir; precompute_ref_log_probs still runs the reference "
                             "once per run.")
        keep_adapters = separate or not is_peft_model(reference) or "ref" in reference.peft_config
        self.hashes = {"reference_weights": weights_fingerprint(reference, keep_adapters=keep_adapters),
                       "tokenizer": tokenizer_fingerprint(tokenizer)}
        self.settings, self.broadcast = settings, broadcast

    def __call__(self, dataset: Dataset, columns: tuple[str, ...]) -> Fingerprint:
        """The fingerprint of a prepared split's token-id `columns` under this run's reference and settings."""
        components = {**self.hashes,
                      "dataset": token_ids_fingerprint(dataset.select_columns(list(columns)).with_format("arrow")[:]),
                      **self.settings}
        shared = [components]
        if self.broadcast is not None:
            self.broadcast(shared, from_process=0)
        return Fingerprint(shared[0])


def rows_read(args, num_processes: int) -> int | None:
    """How many train rows a run with `max_steps` reads (steps × per-device batch × accumulation × processes), or
    `None` when it runs by epochs."""
    if args.max_steps is None or args.max_steps <= 0:
        return None
    return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes


def rows_read_per_batch(args, rows: int, num_processes: int, adapters: bool) -> int | None:
    """How many of the train split's `rows` a run with `max_steps` reads, when that is fewer than all of them and the
    reference is the adapter-disabled base: those rows' reference log-probs are then computed per batch as they are
    read (nothing more is loaded), instead of precomputed over the whole split. `None`: precompute the whole split (the
    run reads all of it, or without adapters a per-batch reference would need a second model in memory)."""
    read = rows_read(args, num_processes)
    if read is None or read >= rows:
        return None
    if not adapters:
        logger.info("max_steps=%d reads %d of the %d train rows, but without adapters a per-batch reference needs a "
                    "second model in memory: the reference is precomputed over all %d rows", args.max_steps, read,
                    rows, rows)
        return None
    logger.info("max_steps=%d reads %d of the %d train rows: their reference log-probs are computed per batch as they "
                "are read (the adapter-disabled base), not precomputed over all %d", args.max_steps, read, rows, rows)
    return read


def cached_precompute(cache: ReferenceCache, fingerprint: Fingerprint, dataset: Dataset, name: str,
                      compute: Callable[[], Dataset], *, is_main: bool = True,
                      barrier: Callable[[], None] = lambda: None) -> Dataset:
    """`dataset` with its `ref_chosen_logps`/`ref_rejected_logps` columns: read from `cache` when an entry matches
    `fingerprint`, else `compute()`d (TRL's precompute) and written there by the main process."""
    cached = cache.load(fingerprint, len(dataset))
    if cached is not None:
        logger.info("Reference log-probs of the %s split (%d rows) read from %s: no reference forward", name,
                    len(dataset), cache.path(fingerprint))
        columns = Dataset.from_dict({"ref_chosen_logps": cached["chosen"].numpy(),
                                     "ref_rejected_logps": cached["rejected"].numpy()})
        return concatenate_datasets([dataset, columns], axis=1)
    closest = cache.closest(fingerprint, name)
    logger.info("Computing reference log-probs of the %s split (%d rows) once, cached in %s%s", name, len(dataset),
                cache.directory, "" if closest is None else
                f" (no cached entry matches; the closest, {closest[0].name}, was computed for another "
                f"{', '.join(closest[1])})")
    if is_main:
        cache.check_writable()
    prepared = compute()
    if is_main:
        values = prepared.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).with_format("torch")[:]
        cache.save(fingerprint, name, values["ref_chosen_logps"], values["ref_rejected_logps"])
    barrier()
    return prepared
