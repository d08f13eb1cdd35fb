"""Checkpoints: DeepSpeed shards + trainer state for resume, and consolidated save_pretrained exports.

Resume checkpoint: `run_dir/checkpoints/checkpoint_step{N}/`, written by every rank straight into the run's
storage (which every node sees) and only then reported to Ray Train (`CheckpointUploadMode.NO_UPLOAD`):
  deepspeed/            engine.save_checkpoint: model states (rank 0, or every rank's partition under
                        ZeRO-3), each rank's ZeRO optimizer partition, the LR scheduler, `latest`
  train_state.json      epoch, micro-batches done in that epoch, optimizer steps (the data position)
  rng_rank{R}.pt        python/numpy/torch (and CUDA) RNG states of rank R
  complete.json         written last, by rank 0 once every rank has written: step, world size, every file's
                        size. A directory without it (or whose files differ from it) is a partial write.
Why not Ray's upload from a local directory: Ray Train registers a checkpoint only when its controller next
polls the workers (every 2 s), so a worker killed in between restarted from the previous checkpoint, with
the newer one left on disk beyond `num_to_keep` (issue 19). Sealed on disk, the newest complete checkpoint
is found whether or not Ray registered it (`newest_complete`), and the run removes the unregistered ones
when it ends.
Every rank must call `save_checkpoint` (DeepSpeed saves contain collectives; a rank-0 guard hangs,
ray#56997). Checkpoints are taken only at optimizer-step boundaries, never inside gradient accumulation.
Loading needs the same ZeRO stage and world size (DeepSpeed's universal checkpoints are not used).

Export: a standard save_pretrained directory (model + processor), which `gapray measure model=<dir>` and the
Serve replicas load; rank 0 writes it. Under ZeRO-3 the weights are consolidated on rank 0's CPU, one module
at a time (`export_pretrained`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

DS_DIR, DS_TAG = "deepspeed", "state"
EXPERIMENT = "checkpoints"  # run_dir/checkpoints: Ray Train's experiment directory (RunConfig name)
COMPLETE = "complete.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / EXPERIMENT / f"checkpoint_step{step:08d}"


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, state: TrainState, directory: str | Path, rank: int, world_size: int = 1) -> None:
    """Every rank: its DeepSpeed shards and RNG into the one shared `directory`; rank 0 the trainer state,
    and once every rank has written, complete.json (the seal)."""
    directory = Path(directory)
    if rank == 0 and directory.exists():  # a partial write of this step by an attempt that was killed
        shutil.rmtree(directory)
    _barrier()
    engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
    if rank == 0:
        (directory / "train_state.json").write_text(json.dumps(dataclasses.asdict(state)))
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    _barrier()  # every rank's files are closed: their sizes are final
    if rank == 0:
        files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
        tmp = directory / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps({"step": state.step, "world_size": world_size, "files": files}))
        os.replace(tmp, directory / COMPLETE)  # atomic: a seal is whole or absent
    _barrier()


def is_complete(directory: str | Path, world_size: int) -> int | None:
    """The step of a sealed checkpoint written by `world_size` ranks whose files are all there at their
    recorded sizes; None for anything else (partial, foreign, another world size)."""
    directory = Path(directory)
    try:
        seal = json.loads((directory / COMPLETE).read_text())
        ok = seal["world_size"] == world_size and all(
            (directory / rel).is_file() and (directory / rel).stat().st_size == size for rel, size in seal["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(seal["step"]) if ok else None


def newest_complete(run_dir: str | Path, world_size: int) -> tuple[int, Path] | None:
    """(step, directory) of the newest complete checkpoint on disk under run_dir/checkpoints, if any."""
    found = [(step, d) for d in Path(run_dir, EXPERIMENT).glob("checkpoint_*")
             if (step := is_complete(d, world_size)) is not None]
    return max(found) if found else None


def checkpoint_step(directory: str | Path) -> int:
    return int(json.loads((Path(directory) / "train_state.json").read_text())["step"])


def remove_unregistered(run_dir: str | Path, kept: set[str]) -> list[str]:
    """Delete the checkpoint directories Ray Train does not hold (`kept`: their names): partial writes and
    complete ones written but never registered. Called when training has finished. Returns the names."""
    gone = []
    for d in sorted(Path(run_dir, EXPERIMENT).glob("checkpoint_*")):
        if d.is_dir() and d.name not in kept:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


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


def export_pretrained(janus_model, directory: str | Path, *, zero_stage: int, rank: int, engine=None) -> None:
    """All ranks call it: the trained weights as a save_pretrained directory (written by rank 0).

    Under ZeRO-3 (`engine` given) the parameters are consolidated on rank 0 alone, one module at a time, into
    its CPU memory (DeepSpeed's 16-bit consolidation, in the weights' own dtype): no rank ever holds the whole
    model on its device, which at 7B would add 14.8 GB to each GPU at the end of every phase."""
    import torch.distributed as dist

    if zero_stage == 3:
        # keys as the engine's module names them: ImageTokenLogprobs holds the Janus model as `.janus`
        state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            janus_model.model.save_pretrained(str(directory), state_dict={
                k.removeprefix("janus."): v for k, v in state.items()})
            janus_model.processor.save_pretrained(str(directory))
    elif rank == 0:
        janus_model.save_pretrained(str(directory))
    if dist.is_initialized():
        dist.barrier()  # nobody reads the directory before rank 0 has written it
