"""Checkpoints: DeepSpeed shards + trainer state for resume, and consolidated save_pretrained exports.

Resume checkpoint (one `ray.train.report` checkpoint directory; every rank writes its part into its own
local directory and Ray merges them in storage):
  deepspeed/            engine.save_checkpoint: model states (rank 0, or every rank's partition under
                        ZeRO-3), each rank's ZeRO optimizer partition, the LR scheduler, `latest`
  train_state.json      epoch, micro-batches done in that epoch, optimizer steps (the data position)
  rng_rank{R}.pt        python/numpy/torch (and CUDA) RNG states of rank R
Every rank must call `save_checkpoint` (DeepSpeed saves contain collectives; a rank-0 guard hangs,
ray#56997). Checkpoints are taken only at optimizer-step boundaries, never inside gradient accumulation.
Loading needs the same ZeRO stage and world size (DeepSpeed's universal checkpoints are not used).

Export: a standard save_pretrained directory (model + processor) via `JanusModel.save_pretrained`, which
`gapray measure model=<dir>` and the Serve replicas load. Under ZeRO-3 the parameters are gathered on
every rank once for the save (the full model fits one device at export time); rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

DS_DIR, DS_TAG = "deepspeed", "state"


@dataclasses.dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    micro_step: int = 0  # global micro-batches completed in the current epoch (where its data resumes)
    step: int = 0  # optimizer steps completed in the run


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, state: TrainState, directory: str | Path, rank: int) -> None:
    """Every rank: its DeepSpeed shards, the trainer state and its RNG into `directory` (rank-local)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
    (directory / "train_state.json").write_text(json.dumps(dataclasses.asdict(state)))
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")


def load_checkpoint(engine, directory: str | Path, rank: int) -> TrainState:
    """Every rank: model, optimizer and LR schedule into `engine`; RNG restored; returns the data position."""
    directory = Path(directory)
    path, _ = engine.load_checkpoint(str(directory / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {directory / DS_DIR}")
    rng = directory / f"rng_rank{rank}.pt"
    if rng.is_file():  # absent when the world size grew; the data order does not depend on it
        set_rng_state(torch.load(rng, weights_only=False))
    return TrainState(**json.loads((directory / "train_state.json").read_text()))


def export_pretrained(janus_model, directory: str | Path, *, zero_stage: int, rank: int) -> None:
    """All ranks call it: the trained weights as a save_pretrained directory (written by rank 0)."""
    import torch.distributed as dist

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(janus_model.model.parameters()), modifier_rank=None):
            if rank == 0:
                janus_model.save_pretrained(str(directory))
    elif rank == 0:
        janus_model.save_pretrained(str(directory))
    if dist.is_initialized():
        dist.barrier()  # nobody reads the directory before rank 0 has written it
