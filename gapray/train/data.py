"""Preference data for training: which Parquet file, which columns, and the batches each worker sees.

A preference dir holds `sft.parquet` (gapray.data.schemas.SFT_SCHEMA) and/or `dpo.parquet` (DPO_SCHEMA,
optionally with reference log-probs). Images are token ids; prompts are tokenized in the worker with
the model's own processor (the chat template the sampler used).

Order, and so resume and run-to-run equality, is exactly reproducible: the driver reads the Parquet file
once into Ray's object store (ray.data.read_parquet, materialized); every worker streams the whole set
from there in file order (preserve_order), shuffles it through a local buffer seeded by (seed, epoch)
(the same on every rank), cuts it into global micro-batches of num_workers x micro_batch_size rows and
keeps its own slice. Ray's streaming_split would move less data per worker but hands blocks to whichever
worker asks first, with no order guarantee. Preference sets are small (token ids: 2,265 Janus-Pro pairs
are ~10 MB), so every worker streaming all of it costs nothing that matters. The last incomplete global
batch of an epoch is dropped, so every rank runs the same number of steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from gapray.errors import UserError
from gapray.models.sampler import derive_seed

FILES = {"sft": "sft.parquet", "dpo": "dpo.parquet"}
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def preference_file(data_dir: str, objective: str) -> Path:
    path = Path(data_dir) / FILES[objective]
    if not path.is_file():
        have = sorted(p.name for p in Path(data_dir).glob("*.parquet")) if Path(data_dir).is_dir() else []
        raise UserError(f"data: '{path}' not found (objective={objective} reads {FILES[objective]}; "
                        f"'{data_dir}' holds: {', '.join(have) or 'nothing'})")
    return path


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def has_reference_logps(path: Path) -> bool:
    """True when dpo.parquet carries both reference columns with no nulls."""
    schema = pq.read_schema(path)
    if not all(c in schema.names for c in REF_COLUMNS):
        return False
    table = pq.read_table(path, columns=list(REF_COLUMNS))
    return all(table.column(c).null_count == 0 for c in REF_COLUMNS)


def columns(objective: str, reference_from_data: bool) -> list[str]:
    if objective == "sft":
        return ["prompt", "image_tokens"]
    return ["prompt", "chosen_tokens", "rejected_tokens", *(REF_COLUMNS if reference_from_data else ())]


def epoch_seed(seed: int, epoch: int) -> int:
    return derive_seed(seed, "train-order", epoch) % 2**32


def _stack(col) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(x) for x in col]).astype(np.int64))  # astype copies


def uncond_rows(rows: dict[str, np.ndarray], prob: float, seed: int, epoch: int) -> np.ndarray:
    """Which SFT rows of a batch train as CFG's unconditional row: a hash of (seed, epoch, prompt, tokens) per
    row, so the choice does not depend on batching, workers or resume."""
    return np.array([derive_seed(seed, "uncond", epoch, str(p), np.asarray(t).tobytes().hex()) / 2**63 < prob
                     for p, t in zip(rows["prompt"], rows["image_tokens"])], bool)


def collate(rows: dict[str, np.ndarray], processor_encode, uncond=None) -> dict:
    """A numpy batch (Ray Data or pyarrow) -> tensors. `processor_encode(prompts)` gives left-padded ids/mask;
    `uncond`: (bool mask of rows, fn(ids) -> CFG's unconditional ids) for the rows trained without prompt."""
    prompts = [str(p) for p in rows["prompt"]]
    enc = processor_encode(prompts)
    ids = enc["input_ids"]
    if uncond is not None and uncond[0].any():
        drop = torch.from_numpy(uncond[0]).to(ids.device)
        ids = torch.where(drop[:, None], uncond[1](ids), ids)
    batch = {"input_ids": ids, "attention_mask": enc["attention_mask"], "n_rows": len(prompts)}
    if "image_tokens" in rows:
        batch["tokens"] = _stack(rows["image_tokens"])
    else:
        batch["chosen"] = _stack(rows["chosen_tokens"])
        batch["rejected"] = _stack(rows["rejected_tokens"])
        if REF_COLUMNS[0] in rows:
            batch["ref_chosen_logps"] = torch.tensor(np.asarray(rows[REF_COLUMNS[0]], dtype=np.float32))
            batch["ref_rejected_logps"] = torch.tensor(np.asarray(rows[REF_COLUMNS[1]], dtype=np.float32))
    return batch


def rank_slices(global_batches: Iterable[dict[str, np.ndarray]], rank: int, micro_batch_size: int,
                skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This rank's rows of each global micro-batch, after skipping the first `skip` (resume mid-epoch)."""
    lo, hi = rank * micro_batch_size, (rank + 1) * micro_batch_size
    for i, gb in enumerate(global_batches):
        if i >= skip:
            yield {k: v[lo:hi] for k, v in gb.items()}


def ray_global_batches(shard, *, global_batch_size: int, seed: int, epoch: int,
                       shuffle_buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of global micro-batches from `ray.train.get_dataset_shard` (the unsplit dataset)."""
    kw = dict(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=epoch_seed(seed, epoch)) \
        if shuffle_buffer > 0 else {}
    return shard.iter_batches(batch_size=global_batch_size, batch_format="numpy", drop_last=True, **kw)


def local_global_batches(path: Path, cols: list[str], *, global_batch_size: int, seed: int, epoch: int,
                         shuffle_buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """backend=local: the same cut into batches from a pyarrow read; shuffle_buffer > 0 shuffles the whole
    epoch with the (seed, epoch) seed (a full permutation, not Ray's buffer: orders differ between backends)."""
    table = pq.read_table(path, columns=cols)
    data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in cols}
    order = np.arange(table.num_rows)
    if shuffle_buffer > 0:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(table.num_rows)
    for start in range(0, table.num_rows - global_batch_size + 1, global_batch_size):
        idx = order[start:start + global_batch_size]
        yield {c: v[idx] for c, v in data.items()}
