"""SFT and DPO on image tokens: the loop both backends share, and the Ray Train worker loop around it.

What it supports
  - objective sft (NLL of the images in sft.parquet) or dpo (pairs in dpo.parquet); losses in losses.py;
  - trainable groups from conf (default the language model only, the paper's best), the rest frozen;
  - DPO reference log-probs from the data (precomputed) or from a frozen copy of the starting model;
  - backend=ray: a TorchTrainer; every worker wraps the model in a DeepSpeed ZeRO engine (stage 0-3),
    streams the preference data from ray.train.get_dataset_shard, writes sealed checkpoints into the run
    directory and reports them through ray.train.report (every rank), and resumes from the newest complete
    one (registered by Ray or not, checkpoint.py): model, optimizer, LR schedule, data position and RNG;
    FailureConfig restarts failed workers that way, and running the same run_dir again resumes;
  - backend=local: the same loop in one process on plain PyTorch, on model.device (no DeepSpeed, no
    mid-run checkpoints, no resume);
  - a consolidated save_pretrained directory at the end (run_dir/model) and after the epochs listed in
    checkpoint.export_epochs (run_dir/model_epoch{E}): what Serve reloads and `gapray measure` reads;
  - metrics with TRL's names (loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
    logps/chosen, logps/rejected; SFT: loss, logps) plus learning_rate and per-worker
    perf/step_time_s, perf/samples_per_s, perf/image_tokens_per_s, averaged over ranks and accumulated
    micro-batches; one line per logged step in run_dir/metrics.jsonl and Ray gauges for the dashboard;
    ray.train.report (a barrier across workers in Train V2) carries them with every checkpoint.
Assumes: every image has the model's T image tokens; checkpoints fall on optimizer steps (see
checkpoint.py); an epoch uses whole accumulation groups of global micro-batches (data.py drops the rest).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gapray.config import worker_gpus
from gapray.models.loading import load_model
from gapray.errors import UserError
from gapray.models.janus import image_token_logprobs, resolve_device
from gapray.models.sampler import uncond_input_ids
from gapray.train import data as tdata
from gapray.train.checkpoint import (EXPERIMENT, TrainState, checkpoint_dir, checkpoint_step, export_pretrained,
                                     load_checkpoint, newest_complete, remove_unregistered, save_checkpoint)
from gapray.train.losses import dpo_loss, sft_loss

# The parameter groups `trainable` may name (PAPER.md: training the LLM alone worked best).
TRAINABLE = {
    "language_model": lambda m: m.model.language_model,
    "generation_head": lambda m: m.model.generation_head,
    "generation_aligner": lambda m: m.model.generation_aligner,
    "generation_embeddings": lambda m: m.model.generation_embeddings,
}


@dataclasses.dataclass
class Plan:
    """What the driver works out once and every worker needs (paths are absolute: workers run elsewhere)."""
    path: str  # the Parquet file
    columns: list[str]
    reference: str  # dpo: "data" or "model"; sft: ""
    n_rows: int
    world_size: int
    micro_per_epoch: int  # global micro-batches per epoch, a multiple of gradient_accumulation_steps
    steps_per_epoch: int
    total_steps: int
    run_dir: str

    @property
    def model_dir(self) -> str:
        return str(Path(self.run_dir) / "model")


@dataclasses.dataclass
class TrainResult:
    model_dir: str  # the consolidated save_pretrained directory
    steps: int
    metrics: dict  # the last reported metrics
    checkpoint: str | None  # the latest resume checkpoint (Ray backend)


class ImageTokenLogprobs(torch.nn.Module):
    """What DeepSpeed wraps: the Janus model, with a forward that returns teacher-forced image-token log-probs
    (the one definition, gapray.models.janus.image_token_logprobs), so training goes through engine.forward."""

    def __init__(self, janus):
        super().__init__()
        self.janus = janus

    def forward(self, input_ids, attention_mask, tokens):
        return image_token_logprobs(self.janus, input_ids, attention_mask, tokens)


class LocalEngine:
    """The slice of DeepSpeedEngine the loop uses (call, backward, step), on plain PyTorch in one process.
    Like DeepSpeed it divides the loss by the accumulation steps and steps the optimizer on boundaries."""

    def __init__(self, module, optimizer, lr_scheduler, gradient_accumulation_steps: int, max_grad_norm: float):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.gas, self.max_grad_norm = gradient_accumulation_steps, max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = next(module.parameters()).device
        self.micro_steps = 0

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss):
        (loss / self.gas).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.gas:
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


# ---- the model, the optimizer ---------------------------------------------------------------------------
def freeze_for_training(model, groups: Iterable[str]) -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    for group in groups:
        TRAINABLE[group](model).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def prepare_model(cfg: DictConfig, reference: str):
    """-> (JanusModel, policy module, trainable params, frozen reference module or None), all on CPU."""
    torch.manual_seed(cfg.seed)
    jm = load_model(OmegaConf.merge(cfg.model, {"device": "cpu"}))  # engines move it to their device
    ref = None
    if cfg.objective == "dpo" and reference == "model":  # copied before any ZeRO-3 partitioning
        same = cfg.get("reference_model") in (None, "", cfg.model.path)  # the starting model: copy, not reload
        frozen = copy.deepcopy(jm.model) if same else \
            load_model(OmegaConf.merge(cfg.model, {"path": cfg.reference_model, "device": "cpu"})).model
        ref = ImageTokenLogprobs(frozen.requires_grad_(False).eval())
    params = freeze_for_training(jm.model, cfg.trainable)
    if cfg.gradient_checkpointing:
        # non-reentrant: the frozen embeddings feed it inputs without grad, which the reentrant variant would
        # not backpropagate through
        jm.model.model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
    jm.model.train()
    return jm, ImageTokenLogprobs(jm.model), params, ref


def make_optimizer(params, o: DictConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                             weight_decay=o.weight_decay)


def make_scheduler(optimizer, o: DictConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if o.lr_scheduler_type == "constant" and o.warmup_steps else o.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=total_steps)


# ---- one step ----------------------------------------------------------------------------------------------
def compute_loss(policy, batch: dict, cfg: DictConfig, reference=None) -> tuple[torch.Tensor, dict]:
    """Loss and metrics of one micro-batch. `policy`/`reference` map (ids, mask, tokens) -> (B, T) log-probs."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if cfg.objective == "sft":
        return sft_loss(policy(ids, mask, batch["tokens"]))
    # chosen and rejected in one forward (TRL's concatenated forward): rows [chosen..., rejected...]
    ids2, mask2 = torch.cat([ids, ids]), torch.cat([mask, mask])
    tokens = torch.cat([batch["chosen"], batch["rejected"]])
    chosen, rejected = policy(ids2, mask2, tokens).chunk(2)
    if reference is None:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = reference(ids2, mask2, tokens).sum(-1).chunk(2)
    lc = cfg.loss
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=lc.beta, loss_type=lc.loss_type,
                    label_smoothing=lc.label_smoothing, rpo_alpha=lc.rpo_alpha, average_logps=lc.average_logps)


def train_step(engine, batch: dict, cfg: DictConfig, reference=None) -> dict[str, float]:
    """Forward, backward, and an optimizer step when this micro-batch closes an accumulation group."""
    loss, metrics = compute_loss(engine, batch, cfg, reference)
    engine.backward(loss)
    engine.step()
    return {k: float(v) for k, v in metrics.items()}


class StepWindow:
    """The micro-batches of one optimizer step: mean metrics, and this worker's throughput."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = self.rows = self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, float], rows: int, tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n, self.rows, self.tokens = self.n + 1, self.rows + rows, self.tokens + tokens

    def result(self) -> dict[str, float]:
        dt = time.perf_counter() - self.t0
        out = {k: v / self.n for k, v in self.sums.items()}
        out.update({"perf/step_time_s": dt, "perf/samples_per_s": self.rows / dt,
                    "perf/image_tokens_per_s": self.tokens / dt})
        return out


def image_tokens(batch: dict) -> int:
    """Image tokens the policy reads in this micro-batch (a DPO pair is two images)."""
    return batch["tokens"].numel() if "tokens" in batch else batch["chosen"].numel() + batch["rejected"].numel()


def train_epochs(engine, jm, cfg: DictConfig, plan: Plan, state: TrainState,
                 epoch_batches: Callable[[int, int], Iterable[dict]], reference,
                 on_step: Callable[[TrainState, dict], None]) -> TrainState:
    """The loop both backends run, from `state` (a resumed data position) to the end of the plan.

    epoch_batches(epoch, skip) yields this worker's numpy micro-batches of an epoch, the first `skip` left
    out; `jm` (the JanusModel) tokenizes prompts; on_step(state, metrics) runs after every optimizer step.
    """
    encode = jm.generation_inputs

    def uncond(ids):
        return uncond_input_ids(ids, [jm.bos_id, jm.boi_id], jm.pad_id)

    ga = cfg.gradient_accumulation_steps
    while state.epoch < cfg.epochs and state.step < plan.total_steps:
        window = StepWindow()
        for rows in itertools.islice(epoch_batches(state.epoch, state.micro_step), plan.micro_per_epoch - state.micro_step):
            drop = None
            if cfg.objective == "sft" and cfg.loss.uncond_prob > 0:
                drop = (tdata.uncond_rows(rows, cfg.loss.uncond_prob, cfg.seed, state.epoch), uncond)
            batch = tdata.collate(rows, encode, drop)
            batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            window.add(train_step(engine, batch, cfg, reference), batch["n_rows"], image_tokens(batch))
            state.micro_step += 1
            if state.micro_step % ga:
                continue
            state.step += 1
            if state.micro_step == plan.micro_per_epoch:
                state.epoch, state.micro_step = state.epoch + 1, 0
            on_step(state, window.result())
            if state.step >= plan.total_steps:
                return state
            window = StepWindow()
        if state.micro_step != 0:
            raise RuntimeError(f"epoch {state.epoch} ended after {state.micro_step} of {plan.micro_per_epoch} "
                               f"micro-batches: did {plan.path} change during the run?")
    return state


class MetricsLog:
    """run_dir/metrics.jsonl, written by rank 0: one line per logged step. On resume the lines of steps past
    the checkpoint are dropped, since those steps run again."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int):
        self.path, self.enabled = Path(run_dir) / "metrics.jsonl", enabled
        if enabled and self.path.exists():
            kept = [ln for ln in _metric_lines(self.path) if json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(f"{ln}\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in SHOWN)
            # Not print(): in a Ray Train worker print() is patched to log the line through Train's logger and,
            # stdout being redirected there, to print it as well, so every line reached the job log twice.
            sys.stdout.write(f"[train] step {metrics['step']} epoch {metrics['epoch']:.2f}: {shown}\n")
            sys.stdout.flush()


SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "perf/image_tokens_per_s")


def _metric_lines(path: Path) -> list[str]:
    """The whole lines of metrics.jsonl: a last line a killed worker cut short is dropped (its step runs again)."""
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if ln]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return lines


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in _metric_lines(path)] if path.exists() else []


def step_metrics(state: TrainState, plan: Plan, metrics: dict, lr: float) -> dict:
    return {"step": state.step, "epoch": state.epoch + state.micro_step / plan.micro_per_epoch,
            "learning_rate": lr, **metrics}


def is_checkpoint_step(cfg: DictConfig, plan: Plan, state: TrainState) -> bool:
    every = cfg.checkpoint.every_n_steps
    return state.micro_step == 0 or state.step >= plan.total_steps or bool(every and state.step % every == 0)


def export_dir(plan: Plan, epoch: int) -> str:
    return str(Path(plan.run_dir) / f"model_epoch{epoch}")


# ---- planning (driver) -------------------------------------------------------------------------------------
def plan_run(cfg: DictConfig) -> Plan:
    """Check the data against the config and size the run. Raises UserError."""
    path = tdata.preference_file(cfg.data, cfg.objective)
    reference = ""
    if cfg.objective == "dpo":
        complete = tdata.has_reference_logps(path)
        reference = cfg.loss.reference
        if reference == "auto":
            reference = "data" if complete else "model"
        elif reference == "data" and not complete:
            raise UserError(f"loss.reference=data: {path} lacks complete ref_chosen_logp/ref_rejected_logp columns "
                            f"(use loss.reference=model or auto)")
    n_rows = tdata.count_rows(path)
    world = cfg.scaling.num_workers if cfg.backend == "ray" else 1
    ga = cfg.gradient_accumulation_steps
    steps_per_epoch = n_rows // (world * cfg.micro_batch_size) // ga
    if steps_per_epoch == 0:
        raise UserError(f"data: {path} has {n_rows} rows, fewer than one optimizer step needs "
                        f"(num_workers {world} x micro_batch_size {cfg.micro_batch_size} x "
                        f"gradient_accumulation_steps {ga})")
    total = steps_per_epoch * cfg.epochs
    return Plan(path=str(path.resolve()), columns=tdata.columns(cfg.objective, reference == "data"),
                reference=reference, n_rows=n_rows, world_size=world, micro_per_epoch=steps_per_epoch * ga,
                steps_per_epoch=steps_per_epoch, total_steps=min(total, cfg.max_steps or total),
                run_dir=str(Path(cfg.run_dir).resolve()))


def run_training(cfg: DictConfig, *, after_step: Callable[[TrainState, int], None] | None = None,
                 worker_env: dict[str, str] | None = None) -> TrainResult:
    """Train as `cfg` (a TrainConfig) says: what jobs/train.py and the curriculum driver call.

    `after_step(state, rank)` runs in every worker after each optimizer step (before its checkpoint);
    `worker_env` is set in every worker's environment before DeepSpeed starts (Ray backend).
    """
    cfg = copy.deepcopy(cfg)
    if Path(cfg.model.path).exists():  # workers run in another directory
        cfg.model.path = str(Path(cfg.model.path).resolve())
    if cfg.get("reference_model") and Path(cfg.reference_model).exists():
        cfg.reference_model = str(Path(cfg.reference_model).resolve())
    plan = plan_run(cfg)
    run_dir = Path(plan.run_dir)
    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if cfg.backend == "local" and (run_dir / "model").exists():
        raise UserError(f"run_dir '{cfg.run_dir}' already holds a trained model (backend=local does not resume); "
                        f"pass overwrite=true to train again")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if cfg.backend == "local":
        return run_local(cfg, plan, after_step)
    return run_ray(cfg, plan, after_step, worker_env or {})


# ---- backend=local ---------------------------------------------------------------------------------------
def run_local(cfg: DictConfig, plan: Plan, after_step=None) -> TrainResult:
    jm, policy, params, reference = prepare_model(cfg, plan.reference)
    device = resolve_device(cfg.model.device)
    policy.to(device)
    if reference is not None:
        reference.to(device)
    optimizer = make_optimizer(params, cfg.optim)
    engine = LocalEngine(policy, optimizer, make_scheduler(optimizer, cfg.optim, plan.total_steps),
                         cfg.gradient_accumulation_steps, cfg.optim.max_grad_norm)
    log = MetricsLog(plan.run_dir, enabled=True, resume_step=0)
    last: dict = {}

    def epoch_batches(epoch: int, skip: int):
        batches = tdata.local_global_batches(Path(plan.path), plan.columns, global_batch_size=cfg.micro_batch_size,
                                             seed=cfg.seed, epoch=epoch, shuffle_buffer=cfg.shuffle_buffer)
        return tdata.rank_slices(batches, 0, cfg.micro_batch_size, skip)

    def on_step(state: TrainState, metrics: dict) -> None:
        if after_step is not None:
            after_step(state, 0)
        if state.step % cfg.log_every_n_steps == 0 or is_checkpoint_step(cfg, plan, state):
            last.clear()
            last.update(step_metrics(state, plan, metrics, optimizer.param_groups[0]["lr"]))
            log.write(last)
        if state.micro_step == 0 and state.epoch in cfg.checkpoint.export_epochs:
            export_pretrained(jm, export_dir(plan, state.epoch), zero_stage=0, rank=0)

    state = train_epochs(engine, jm, cfg, plan, TrainState(), epoch_batches, reference, on_step)
    export_pretrained(jm, plan.model_dir, zero_stage=0, rank=0)
    return TrainResult(model_dir=plan.model_dir, steps=state.step, metrics=dict(last), checkpoint=None)


# ---- backend=ray -------------------------------------------------------------------------------------------
def run_ray(cfg: DictConfig, plan: Plan, after_step, worker_env: dict[str, str]) -> TrainResult:
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():  # one policy for starting Ray (loopback only, sized to the run): the caller's
        raise RuntimeError("train.backend=ray needs a running Ray: call gapray.backends.ray.init_ray(cfg) first "
                           "(jobs/train.py and the curriculum driver do)")
    # Materialized once here: preference sets are small, and re-reading the file every epoch in every
    # worker starts read tasks each time (~15 s per epoch on a 2-core machine).
    dataset = ray.data.read_parquet(plan.path).select_columns(plan.columns)
    dataset.context.enable_progress_bars = False  # bars from every worker each epoch drown the step log
    dataset = dataset.materialize()
    s = cfg.scaling
    gpus = worker_gpus(s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "plan": dataclasses.asdict(plan),
                           "after_step": after_step, "worker_env": worker_env},
        # Ray wants use_gpu whenever a worker reserves GPUs, and then picks nccl: the process group follows
        # scaling.use_gpu instead, so reserved logical GPUs (gpus_per_worker without use_gpu) train on gloo
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": s.cpus_per_worker, "GPU": gpus, **s.resources},
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(name=EXPERIMENT, storage_path=plan.run_dir,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep)),
        datasets={"train": dataset},
        # unsplit and in file order: every worker cuts the same global batches (data.py)
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()  # result.metrics: those reported with the latest checkpoint (the last step's)
    # checkpoints a killed worker wrote but Ray never registered would otherwise stay beyond num_to_keep
    remove_unregistered(plan.run_dir, {Path(c.path).name for c, _ in result.best_checkpoints or []})
    return TrainResult(model_dir=plan.model_dir, steps=int(result.metrics.get("step", 0)), metrics=dict(result.metrics),
                       checkpoint=result.checkpoint.path if result.checkpoint else None)


def resume_checkpoint(registered, run_dir: str, world_size: int) -> str | None:
    """The newer of the checkpoint Ray Train registered and the newest complete one on disk (a worker killed
    after sealing a checkpoint but before Ray's controller polled it leaves one Ray does not know)."""
    candidates = []
    if registered is not None:
        candidates.append((checkpoint_step(registered.path), registered.path))
    on_disk = newest_complete(run_dir, world_size)
    if on_disk is not None:
        candidates.append((on_disk[0], str(on_disk[1])))
    return max(candidates)[1] if candidates else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mean_over_ranks(metrics: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine over its model, its slice of every global batch, checkpoints."""
    os.environ.update(config["worker_env"])
    import deepspeed
    import ray.train
    from ray.util.metrics import Gauge

    from gapray.train.deepspeed import deepspeed_config, use_prebuilt_ops_only

    cfg, plan, after_step = OmegaConf.create(config["cfg"]), Plan(**config["plan"]), config["after_step"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    use_prebuilt_ops_only()  # before deepspeed.initialize starts its comm backend

    jm, policy, params, reference = prepare_model(cfg, plan.reference)
    ds_config = deepspeed_config(cfg, cfg.scaling.use_gpu)
    optimizer = make_optimizer(params, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, plan.total_steps)
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if reference is not None:  # on the policy's device, in its precision, so that step 0 gives ln 2 exactly
        reference.to(engine.device)
        if ds_config["bf16"]["enabled"]:
            reference.to(torch.bfloat16)

    state = TrainState()
    resume_from = resume_checkpoint(ray.train.get_checkpoint(), plan.run_dir, world)
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, rank)
    else:
        seed_everything(cfg.seed + rank)
    log = MetricsLog(plan.run_dir, enabled=rank == 0, resume_step=state.step)
    gauges = {k: Gauge(f"gapray_train_{k.replace('/', '_')}", tag_keys=("rank",))
              for k in ("loss", "perf/samples_per_s", "perf/image_tokens_per_s")}
    shard = ray.train.get_dataset_shard("train")
    stage = cfg.deepspeed.zero_stage

    def epoch_batches(epoch: int, skip: int):
        batches = tdata.ray_global_batches(shard, global_batch_size=world * cfg.micro_batch_size, seed=cfg.seed,
                                           epoch=epoch, shuffle_buffer=cfg.shuffle_buffer)
        return tdata.rank_slices(batches, rank, cfg.micro_batch_size, skip)

    def on_step(state: TrainState, metrics: dict) -> None:
        if after_step is not None:
            after_step(state, rank)
        for k, g in gauges.items():
            g.set(metrics[k], tags={"rank": str(rank)})
        save = is_checkpoint_step(cfg, plan, state)
        if not (save or state.step % cfg.log_every_n_steps == 0):
            return
        metrics = step_metrics(state, plan, mean_over_ranks(metrics, engine.device), optimizer.param_groups[0]["lr"])
        log.write(metrics)
        if not save:  # ray.train.report is a barrier across workers (~1 s here): checkpoints only
            return
        if state.micro_step == 0 and state.epoch in cfg.checkpoint.export_epochs:
            export_pretrained(jm, export_dir(plan, state.epoch), zero_stage=stage, rank=rank, engine=engine)
        if state.step >= plan.total_steps:  # the end: export first, so the last checkpoint's metrics name it
            export_pretrained(jm, plan.model_dir, zero_stage=stage, rank=rank, engine=engine)
            metrics.update(model_dir=plan.model_dir, **weight_spread(jm.model, stage))
        d = checkpoint_dir(plan.run_dir, state.step)  # on the run's storage, sealed before Ray hears of it
        save_checkpoint(engine, state, d, rank, world)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)), checkpoint_dir_name=d.name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    state = train_epochs(engine, jm, cfg, plan, state, epoch_batches, reference, on_step)
    if not Path(plan.model_dir, "config.json").exists():  # a resumed run whose last step was already done
        export_pretrained(jm, plan.model_dir, zero_stage=stage, rank=rank, engine=engine)


def weight_spread(model, zero_stage: int) -> dict[str, float]:
    """max |w_rank - w_rank'| over all parameters: 0 when every rank holds the same weights (all ranks call it).
    Under ZeRO-3 each parameter is gathered in turn; elsewhere every rank holds full copies."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {"weights/rank_spread": 0.0}
    spread = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().double().clone()
        else:
            full = p.detach().double().clone()
        hi, lo = full.clone(), full.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        spread = torch.maximum(spread, (hi - lo).abs().max().cpu())
    return {"weights/rank_spread": float(spread)}
