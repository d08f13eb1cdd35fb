"""Typed configs: YAML under conf/ merged with `key=value` overrides, validated by dataclass schemas.

    gapray measure model=janus-pro-1b images_per_prompt=8 sampling.guidance_scale=5

`model=NAME` picks the preset conf/model/NAME.yaml; `model=PATH_OR_HUB_ID` (anything that is not a
preset) loads that model with default dtype/device. Every user mistake (unknown key, wrong type, bad
value, missing file) raises `UserError` with one line that names the key and what would be valid.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Dict, Optional, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
from omegaconf._yaml import get_yaml_loader

from gapray.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BUILTIN_MODELS = ("tiny",)  # built from config in-process (random weights): tests and benchmarks
# Models that ship inside the package, by name: the shapes-world Janus (jobs/pretrain_world.py made it).
SHIPPED_MODELS = {"shapes": Path(__file__).resolve().parent / "assets" / "shapes-janus"}
DTYPES = ("float32", "bfloat16", "float16")
SCORE_MODES = ("logits", "generate")
BACKENDS = ("local", "ray")  # ray: Serve replicas sample and score, Ray Data streams the verdicts
# `key=NAME` loads conf/<key>/NAME.yaml: a model preset, or a whole experiment (self-improvement presets)
PRESET_GROUPS = ("experiment", "model")


@dataclass
class ModelConfig:
    path: str = "tiny"  # hub id (org/name), a save_pretrained directory, or a built-in name
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu
    compile: bool = False  # sample through a torch.compile'd decode step (CUDA graphs on a GPU; issue 16)


@dataclass
class SamplingConfig:
    guidance_scale: float = 5.0  # Janus-Pro's default CFG weight
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None


@dataclass
class ScoringConfig:
    mode: str = "logits"  # logits: P("1") vs P("0") after "The score is"; generate: parse a free answer
    threshold: float = 0.5  # verdict = p_aligned >= threshold


@dataclass
class AutoscalingConfig:
    """Serve's autoscaling_config (names as in Ray Serve); replicas follow the requests each one has in flight."""
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: Optional[int] = None
    target_ongoing_requests: float = 8.0  # requests, not rows: a sample request is one prompt's images
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0


@dataclass
class ServeConfig:
    """The ModelServer deployment (gapray/serve/server.py): replicas, their resources, dynamic batching."""
    num_replicas: int = 1  # fixed replica count; ignored when autoscaling_config is set
    autoscaling_config: Optional[AutoscalingConfig] = None
    num_cpus: float = 1.0  # logical CPUs per replica
    num_gpus: float = 0.0  # GPUs per replica (fractions share a GPU); > 0 puts the model on cuda
    # model rows per forward batch: a guided image is 2 rows (cond + uncond); null: each replica batches as many as
    # its device's free memory holds once its weights are loaded (gapray.plan.memory_batch_rows)
    max_batch_size: Optional[int] = 32
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill after its first request
    max_ongoing_requests: int = 64  # calls in progress per replica; a replica cuts each into one piece per image
    app_name: str = "gapray"
    route_prefix: Optional[str] = "/gapray"  # HTTP routes <prefix>/sample, <prefix>/score; null: handles only
    http_port: int = 8000  # the Serve HTTP proxy, always on 127.0.0.1 (used when gapray starts Serve)
    access_log: bool = False  # Serve's line per request (one per handle call: ~1,100 of `make run`'s ~1,500 lines)
    log_level: str = "WARNING"  # Serve's own log lines (controller, proxy, replicas, handles): INFO to see them
    # Delete the app before each training phase and deploy it again after, so that the trainer gets the GPUs the
    # replicas hold (on one 8-GPU machine an 8-worker trainer never schedules beside a GPU replica). auto: when
    # both the replicas (num_gpus > 0) and the trainer's workers reserve GPUs; always; never.
    release_for_training: str = "auto"


@dataclass
class DataConfig:
    """The Ray Data verdict pipeline (gapray/backends/ray.py) and the preference data built from it."""
    concurrency: int = 2  # pipeline tasks at once, keeping self_judge requests in flight to Serve (batch_prompts
    # prompts each; with serve.max_batch_size=null, as many as keep the replicas' batches full: prompts_per_block)
    num_cpus: float = 0.1  # logical CPUs per Data actor: they mostly wait on Serve
    min_margin: float = 0.0  # DPO pairs need chosen p_aligned - rejected p_aligned >= min_margin
    reencode_images: bool = True  # training rows carry the decoded picture's VQ tokens, not the sampled ones
    ref_logprobs: bool = False  # precompute reference log-probs of chosen/rejected (the serving policy)
    request_retries: int = 20  # per Serve call: a request lost with its replica is sent again (same seeds)
    memory_mb: int = 512  # memory each pipeline actor asks Ray for (it holds ~365 MiB: torch and pyarrow imported)
    verbose: bool = False  # Ray Data's own lines (execution plans, "execution finished") in the job log


# ---- cluster: what gapray cannot ask Ray before a run (gapray/plan.py: `gapray plan`, the preflight's fit check) ----
@dataclass
class ClusterConfig:
    # memory of each GPU in GiB (2^30 B) as nvidia-smi reports its total (80: A100 80GB; 22.5: A10G or L4); null:
    # this machine's CUDA device, else unknown (no fit check). A config whose estimate exceeds it is refused.
    gpu_memory_gb: Optional[float] = None
# ---- end cluster -----------------------------------------------------------------------------------------------


@dataclass
class ServeAppConfig:
    """What `serve run conf/serve.yaml` passes to gapray.serve.server:app_builder as `args`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


JUDGE_KINDS = ("oracle", "vlm", "none")
JUDGE_MODES = ("logits", "generate")


@dataclass
class JudgeConfig:
    """The external judge (gapray/judges/): the Gen., weak-generation, false-acceptance and win-rate figures and the
    gate's audit read its verdicts (the ledger's oracle_verdict column, with judge_model and judge_p)."""
    kind: Optional[str] = None  # oracle | vlm | none; null: gate.judge's (a run with a gate), else vlm when `model`
    # is set, else oracle (the shapes world's pixel oracle; prompts without world metadata get no verdict)
    model: Optional[str] = None  # vlm: any image-text-to-text hub id (Qwen/Qwen2.5-VL-7B-Instruct) or directory
    mode: str = "logits"  # logits: P("1") vs P("0") after "The score is"; generate: a greedy answer, parsed
    dtype: str = "bfloat16"
    device: str = "auto"  # auto = cuda if available, else cpu (backend=local: beside the policy)
    device_map: Optional[str] = None  # "auto": shard a judge too big for one GPU (72B in bf16 is ~147 GB) over all
    # visible GPUs (accelerate's device_map; overrides `device`)
    batch_size: int = 8  # images per judge forward
    threshold: float = 0.5  # verdict = p >= threshold
    max_new_tokens: int = 16  # generate mode
    # backend=ray: a VLM judge runs in its own Serve app, JudgeServer (gapray/serve/judge.py), called by the policy
    # replicas with the pixels they decode
    num_replicas: int = 1  # JudgeServer replicas, each holding a copy of the VLM; ignored when autoscaling_config is set
    autoscaling_config: Optional[AutoscalingConfig] = None  # JudgeServer replicas by load, as serve.autoscaling_config
    num_gpus: Optional[float] = None  # GPUs per JudgeServer replica (fractions share a GPU); null: serve.num_gpus


@dataclass
class MeasureConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: str = "conf/prompts/geneval_sample.jsonl"
    task: Optional[str] = None  # task name for plain-text prompt files (default: the file's stem)
    max_prompts: Optional[int] = None
    images_per_prompt: int = 4
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    batch_prompts: int = 8  # prompts sampled together (rows = batch_prompts * images_per_prompt * 2 with CFG)
    run_dir: str = "runs/measure"
    overwrite: bool = False  # replace the outputs of an earlier run in run_dir
    grid_prompts: int = 4  # prompts per task shown in the image grids
    backend: str = "local"
    serve: ServeConfig = field(default_factory=ServeConfig)  # backend=ray only
    data: DataConfig = field(default_factory=DataConfig)  # backend=ray only
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # the external judge (default: the shapes oracle)


# ---- training (gapray/train/, jobs/train.py, conf/train.yaml) ----------------------------------------
TRAIN_OBJECTIVES = ("sft", "dpo")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")  # TRL's loss_type names
REFERENCES = ("auto", "data", "model")
TRAINABLE_GROUPS = ("language_model", "generation_head", "generation_aligner", "generation_embeddings")
LR_SCHEDULES = ("constant", "linear", "cosine")  # transformers' lr_scheduler_type names
TRAIN_BACKENDS = ("ray", "local")


@dataclass
class LossConfig:
    """SFT: NLL of the image tokens. DPO: TRL's DPO on image tokens given the prompt (gapray/train/losses.py)."""
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo | robust, as in TRL
    label_smoothing: float = 0.0  # sigmoid: conservative DPO; robust: probability a pair is flipped; < 0.5
    rpo_alpha: Optional[float] = None  # weight of the NLL on the chosen image (the paper's extra term); null: none
    average_logps: bool = False  # per-token mean log-probs in the DPO margin (576 tokens swamp sums); ipo always
    reference: str = "auto"  # data: dpo.parquet's ref_*_logp columns; model: a frozen copy; auto: data if complete
    uncond_prob: float = 0.0  # sft: share of rows trained as CFG's unconditional row (prompt dropped), as in
    # pretraining, so that guidance keeps its reference distribution; drawn per (seed, epoch, row)


@dataclass
class OptimConfig:
    """AdamW (torch's, handed to deepspeed.initialize) and its schedule; transformers' TrainingArguments names."""
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "constant"  # constant | linear | cosine (decay to 0 at the last step)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class DeepSpeedConfig:
    """What goes into the generated DeepSpeed config (gapray/train/deepspeed.py)."""
    zero_stage: int = 2  # 0 (plain data parallel), 1, 2, 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (stages 1-3)
    offload_param: bool = False  # parameters to CPU (stage 3 only)
    bf16: Optional[bool] = None  # null: bf16 when training on GPUs, fp32 on CPU


@dataclass
class TrainScalingConfig:
    """Ray Train's ScalingConfig."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # GPUs each worker reserves (null: 1 with use_gpu, else 0). Reserved GPUs without use_gpu are logical
    # only: a CPU rehearsal of a GPU cluster's scheduling (`ray start --num-gpus=N`), as the tests do.
    gpus_per_worker: Optional[float] = None
    # custom resources each worker reserves besides CPU and GPU: {gapray_train: 1} puts the workers only on the
    # node types that advertise it (cluster/: the training node types), never on a 1-GPU serving node
    resources: Dict[str, float] = field(default_factory=dict)
    # Ray Train's placement: PACK (as few nodes as fit, Ray's default), STRICT_PACK (one node: ZeRO's collectives
    # stay on the node's links; the node must hold every worker), SPREAD, STRICT_SPREAD
    placement_strategy: str = "PACK"


@dataclass
class TrainCheckpointConfig:
    every_n_steps: Optional[int] = None  # DeepSpeed shards via ray.train.report; always at each epoch end
    num_to_keep: Optional[int] = 2  # Ray CheckpointConfig.num_to_keep; null keeps all
    export_epochs: list[int] = field(default_factory=list)  # save_pretrained dirs after these epochs (and the last)


@dataclass
class TrainRecipe:
    """How to train: everything but the starting model, the data and where the run goes. The curriculum
    driver fills those in per phase; TrainConfig (jobs/train.py) adds them as keys."""
    trainable: list[str] = field(default_factory=lambda: ["language_model"])  # the paper: LLM only
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs, benchmarks)
    micro_batch_size: int = 2  # rows per worker per forward; a DPO row is a pair (2 images)
    gradient_accumulation_steps: int = 1
    # recompute the language model's activations in backward: activation memory of one layer instead of all,
    # for about one more forward per step (on in the 7B preset)
    gradient_checkpointing: bool = False
    shuffle_buffer: int = 1024  # rows in the seeded local shuffle buffer (0: file order)
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: TrainScalingConfig = field(default_factory=TrainScalingConfig)
    checkpoint: TrainCheckpointConfig = field(default_factory=TrainCheckpointConfig)
    max_failures: int = 3  # Ray FailureConfig: worker-group restarts from the latest checkpoint
    log_every_n_steps: int = 1
    backend: str = "ray"  # ray: TorchTrainer + DeepSpeed; local: one process, plain PyTorch


@dataclass
class TrainConfig(TrainRecipe):
    model: ModelConfig = field(default_factory=ModelConfig)  # the starting policy (and default reference)
    data: str = ""  # preference dir holding sft.parquet and/or dpo.parquet (gapray.data.schemas)
    objective: str = "dpo"  # sft: NLL on sft.parquet; dpo: pairs from dpo.parquet
    reference_model: Optional[str] = None  # dpo, loss.reference=model: this save_pretrained dir (null: the starting model)
    run_dir: str = "runs/train"  # re-running the same run_dir resumes from its latest checkpoint
    overwrite: bool = False  # delete an earlier run in run_dir and start over


# ---- self-improvement (gapray/curriculum.py, jobs/self_improve.py, conf/self_improve.yaml) -----------------
MODES = ("sft", "dpo", "c-sft", "c-dpo")  # PAPER.md: Algorithm 1 (sft, dpo), + Algorithm 2's replay (c-)
GATE_JUDGES = ("oracle", "vlm", "none")
GATE_ACTIONS = ("stop", "warn")


@dataclass
class GateConfig:
    """The data-quality gate (PAPER.md, co-degradation): an external judge audits accepted images every round."""
    judge: str = "oracle"  # oracle: the shapes world's pixel oracle (prompts without world metadata: not audited);
    # vlm: the VLM of judge.model; none: no audit. Names the run's external judge too, unless judge.kind does
    audit_size: int = 64  # accepted images audited per round (random, seeded)
    min_precision: float = 0.5  # the gate fires when fewer of the audited accepted images are right
    on_fail: str = "stop"  # stop: the run stops (exit 3); warn: recorded and printed, the run goes on (jobs/reproduce.py
    # runs this way, to measure what the gate would have prevented)


CORRUPTIONS = ("none", "flip", "noise")


@dataclass
class CorruptJudgeConfig:
    """Poor supervision on purpose (PAPER.md, co-degradation): the self-verdicts that build training data (the
    sample and replay phases) are corrupted before use. Measures and the ledger keep the model's own verdicts."""
    mode: str = "none"  # none | flip: verdict turned over (p -> 1 - p) | noise: replaced by a fair coin (p uniform)
    rate: float = 0.0  # share of verdicts corrupted; which ones: a seeded hash of (seed, phase, prompt, sample)


@dataclass
class SelfImproveConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the base policy
    prompts: str = "gapray/world/data/train.jsonl"  # sampled, self-judged, trained on, replayed
    eval_prompts: str = "gapray/world/data/eval.jsonl"  # held out: measured before and after, never trained on
    composition_prompts: Optional[str] = None  # a stress test measured beside eval_prompts and reported apart
    # (the shapes world's composition split: bindings no train or eval prompt names); null: not measured
    max_prompts: Optional[int] = None
    max_eval_prompts: Optional[int] = None
    mode: str = "c-sft"  # sft | dpo | c-sft | c-dpo
    rounds: int = 1  # rounds >= 2 start each round from the last round's policy (beyond the paper)
    images_per_prompt: int = 4  # N candidates per training prompt (the paper: 10)
    eval_images_per_prompt: int = 8
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    batch_prompts: int = 8
    replay_epoch: Optional[int] = None  # c-modes: replay the discard pool after this epoch (null: half of train.epochs)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    gate: GateConfig = field(default_factory=GateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # the external judge (gate.judge names its kind)
    corrupt_judge: CorruptJudgeConfig = field(default_factory=CorruptJudgeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # backend=ray
    data: DataConfig = field(default_factory=DataConfig)  # backend=ray
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the GPUs' memory (gapray plan)
    backend: str = "ray"  # ray: driver actor + Serve + Data (+ train.backend); local: one process
    run_dir: str = "runs/self_improve"  # submitting again with the same run_dir resumes
    grid_prompts: int = 4


PROBE_VARIANTS = ("render", "oracle", "self")


@dataclass
class ProbeConfig:
    """jobs/probe_sft.py: does the self-improvement recipe raise Gen. on held-out dev prompts (train split only)?"""
    dev_prompts: int = 60  # grammar.dev_split of the train split: held out of pretraining and of every SFT row
    train_prompts: int = 240  # drawn task-balanced, without repeats, from the rest of the train split
    renders_per_prompt: int = 2  # render: fresh true renders per train prompt (the headroom check's data)
    dev_images: int = 8  # images per dev prompt for each measure
    variants: list[str] = field(default_factory=lambda: list(PROBE_VARIANTS))
    # the model, sampling, N (images_per_prompt), scoring and the training recipe: conf/self_improve.yaml,
    # these key=value overrides, then the command line's run.KEY=VALUE
    run: list[str] = field(default_factory=lambda: ["mode=sft", "train.backend=local"])
    out_dir: str = "runs/probe_sft"
    overwrite: bool = False


@dataclass
class DiagnosticConfig:
    """jobs/reproduce.py's learning-dynamics diagnostic (gapray/diagnostics.py), on each seed's SFT run."""
    train_samples: int = 16  # SFT rows whose generation gradients are taken
    heldout_samples: int = 16  # base-model images of held-out prompts: half the oracle accepts, half it rejects


@dataclass
class ReproduceConfig:
    """jobs/reproduce.py: the paper's table and claims on the shapes world, over seeds."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    modes: list[str] = field(default_factory=lambda: ["sft", "c-sft", "dpo", "c-dpo"])
    rounds: int = 3  # the c-sft runs iterate this many rounds (the table reads their first)
    corrupt_judge: CorruptJudgeConfig = field(default_factory=lambda: CorruptJudgeConfig("flip", 0.5))
    diagnostic: DiagnosticConfig = field(default_factory=DiagnosticConfig)
    # every run's settings: conf/self_improve.yaml, these key=value overrides, then the command line's run.KEY=VALUE
    run: list[str] = field(default_factory=lambda: ["backend=local", "train.backend=local"])
    out_dir: str = "runs/reproduce"


@dataclass
class PretrainConfig:
    """jobs/pretrain_world.py: the shapes-world Janus from scratch (gapray/world/pretrain.py)."""
    out_dir: str = "runs/pretrain_world/model"  # a save_pretrained directory (model + processor)
    seed: int = 0
    vq_steps: int = 1500
    vq_batch: int = 32
    vq_lr: float = 2e-3
    lm_steps: int = 3000
    gen_batch: int = 32
    und_batch: int = 16
    lm_lr: float = 1e-3
    self_generated_at: list[float] = field(default_factory=lambda: [0.5, 0.75])
    self_generated_k: int = 2
    self_generated_prompts: int = 512  # train prompts (task-balanced draw) whose own generations join the pool
    pool_prompts: int = 2000  # train prompts (task-balanced draw) rendered for the understanding pool
    task_alpha: float = 0.0  # prompts drawn by task with weight (rows of the task) ** task_alpha: 0 balanced, 1 uniform
    own_positive_share: Optional[float] = None  # share of accepted images among the own generations of an
    # understanding batch (None: their natural share); see world/pretrain.py Judged.batch
    checks: int = 4  # progress checks (dev figures + a saved model) per run
    dev_prompts: int = 60  # the dev set (grammar.dev_split of train) for progress checks; held out of training
    vq_from: Optional[str] = None  # start from this saved world model's VQ tokenizer (vq_steps=0: as is)
    init_from: Optional[str] = None  # start from this saved world model's weights, all of them (continue training)
    # the language model's shape, for a fresh model (init_from keeps the saved model's own): WORLD_ARCH's defaults
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 344
    save_dtype: str = "float16"  # the shipped checkpoint's storage dtype (loads as float32)
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (CUDA when there is one)
    threads: Optional[int] = None  # torch threads (None: torch's default). 1 is several times faster when
    # other processes load the cores: intra-op threads spin-wait on each other when descheduled.
    overwrite: bool = False


def load_config(schema: type, yaml_path: str | Path | None = None, overrides: list[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, then value checks. Raises UserError."""
    cfg = OmegaConf.structured(schema)
    try:
        if yaml_path is not None:
            yaml_path = Path(yaml_path)
            if not yaml_path.is_file():
                raise UserError(f"config file '{yaml_path}' not found")
            cfg = OmegaConf.merge(cfg, _expand_presets(_load_yaml(yaml_path), schema))
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override '{item}' must look like key=value (e.g. images_per_prompt=8)")
            try:
                yaml.load(item.partition("=")[2], Loader=get_yaml_loader())  # the parser from_dotlist uses
            except yaml.YAMLError as e:
                raise UserError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); "
                                "fix it or quote it") from None
        # presets first (an experiment, then a model), so that key=value overrides refine them
        for group in PRESET_GROUPS:
            for o in overrides:
                key, _, name = o.partition("=")
                if key == group and _is_preset(o):
                    preset = _expand_presets(_load_yaml(_preset_path(key, name)), schema)
                    cfg = OmegaConf.merge(cfg, preset if group == "experiment" else {key: preset})
        dot = OmegaConf.from_dotlist([_preset_override(o) for o in overrides if not _is_preset(o)])
        cfg = OmegaConf.merge(cfg, _expand_presets(dot, schema))
    except (ConfigKeyError, ValidationError) as e:
        raise UserError(_explain(e, schema)) from None
    except OmegaConfBaseException as e:
        raise UserError(f"config: {str(e).splitlines()[0]}") from None
    check_values(cfg)
    return cfg


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"config file {where}: not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _preset_path(group: str, name: str) -> Path:
    return CONF_DIR / group / f"{name}.yaml"


def _is_preset(override: str) -> bool:
    """`model=janus-pro-1b` where conf/model/janus-pro-1b.yaml exists, or `experiment=NAME` (conf/experiment/)."""
    key, _, value = override.partition("=")
    return key in PRESET_GROUPS and value != "" and _preset_path(key, value).is_file()


def _preset_override(override: str) -> str:
    """`model=<path or hub id>` (not a preset) is shorthand for model.path=..."""
    key, _, value = override.partition("=")
    return f"model.path={value}" if key == "model" else override


def _expand_presets(cfg: DictConfig, schema: type) -> DictConfig:
    """In YAML, `model: janus-pro-1b` (a string) means the preset, or a path if no preset has that name."""
    if isinstance(cfg.get("model", None), str):
        name = cfg.model
        preset = _preset_path("model", name)
        cfg.model = OmegaConf.load(preset) if preset.is_file() else {"path": name}
    return cfg


def _explain(e: OmegaConfBaseException, schema: type) -> str:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(schema, parent)
        near = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{f'{parent}.' if parent else ''}{near[0]}'?)" if near else ""
        return f"unknown config key '{key}'{hint}; valid keys here: {', '.join(valid)}"
    msg = str(e).splitlines()[0]
    m = re.search(r"Value '(.*)' (?:of type '.*' )?could not be converted to (\w+)", msg)
    if m:
        return f"config key '{key}': expected {m.group(2).lower()}, got '{m.group(1)}'"
    return f"config key '{key}': {msg}"


def _valid_keys(schema: type, dotted_parent: str) -> list[str]:
    cls = schema
    for part in filter(None, dotted_parent.split(".")):
        f = next((f for f in fields(cls) if f.name == part), None)
        if f is None:
            return []
        # a nested schema: its default_factory, or for an Optional one defaulting to None, its annotation
        sub = type(f.default_factory()) if callable(f.default_factory) else \
            next((t for t in getattr(get_type_hints(cls)[part], "__args__", ()) if is_dataclass(t)), None)
        if not is_dataclass(sub):
            return []
        cls = sub
    return [f.name for f in fields(cls)]


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"config key '{key}': '{value}' is not one of {', '.join(map(str, choices))}{hint}")


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': {what}")


def _check_device(key: str, device: str) -> None:
    _require(device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", device) is not None,
             key, f"'{device}' is not auto, cpu, cuda or cuda:N")


def check_values(cfg: DictConfig) -> None:
    """Range and choice checks the type system cannot express."""
    if "model" in cfg:
        _choice("model.dtype", cfg.model.dtype, DTYPES)
        _check_device("model.device", cfg.model.device)
    if OmegaConf.get_type(cfg) is PretrainConfig:
        _check_device("device", cfg.device)
        for key in ("vq_steps", "lm_steps"):
            _require(cfg[key] >= 0, key, f"must be >= 0, got {cfg[key]}")
        for key in ("vq_batch", "gen_batch", "und_batch", "checks", "dev_prompts", "pool_prompts"):
            _require(cfg[key] >= 1, key, f"must be >= 1, got {cfg[key]}")
        _require(cfg.task_alpha >= 0, "task_alpha", f"must be >= 0 (0 = tasks balanced, 1 = prompts uniform), got {cfg.task_alpha}")
        _require(cfg.own_positive_share is None or 0 <= cfg.own_positive_share <= 1, "own_positive_share",
                 f"must be between 0 and 1 (or null: the natural share), got {cfg.own_positive_share}")
        _require(cfg.lm_hidden % cfg.lm_heads == 0, "lm_hidden",
                 f"must be a multiple of lm_heads ({cfg.lm_heads}), got {cfg.lm_hidden}")
    if OmegaConf.get_type(cfg) is TrainConfig:  # its `data` is a path and its backends differ: own checks
        return check_train(cfg)
    if OmegaConf.get_type(cfg) is SelfImproveConfig:
        check_self_improve(cfg)
    if OmegaConf.get_type(cfg) is ReproduceConfig:
        return check_reproduce(cfg)
    if "sampling" in cfg:
        s = cfg.sampling
        _require(s.guidance_scale > 1, "sampling.guidance_scale",
                 f"must be > 1 for classifier-free guidance (Janus-Pro uses 5), got {s.guidance_scale}")
        _require(s.temperature >= 0, "sampling.temperature", f"must be >= 0 (0 = greedy), got {s.temperature}")
        _require(s.top_k is None or s.top_k >= 1, "sampling.top_k", f"must be >= 1 or null, got {s.top_k}")
        _require(s.top_p is None or 0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1] or null, got {s.top_p}")
    if "judge" in cfg:
        check_judge(cfg)

    if "scoring" in cfg:
        _choice("scoring.mode", cfg.scoring.mode, SCORE_MODES)
        _require(0 <= cfg.scoring.threshold <= 1, "scoring.threshold", f"must be in [0, 1], got {cfg.scoring.threshold}")
    if "images_per_prompt" in cfg:
        _require(cfg.images_per_prompt >= 1, "images_per_prompt", f"must be >= 1, got {cfg.images_per_prompt}")
    if "batch_prompts" in cfg:
        _require(cfg.batch_prompts >= 1, "batch_prompts", f"must be >= 1, got {cfg.batch_prompts}")
    if cfg.get("max_prompts") is not None:
        _require(cfg.max_prompts >= 1, "max_prompts", f"must be >= 1 or null, got {cfg.max_prompts}")
    if "backend" in cfg:
        _choice("backend", cfg.backend, BACKENDS)
    if "serve" in cfg:
        check_serve(cfg.serve)
    if "data" in cfg:
        d = cfg.data
        _require(d.concurrency >= 1, "data.concurrency", f"must be >= 1, got {d.concurrency}")
        _require(d.num_cpus > 0, "data.num_cpus", f"must be > 0, got {d.num_cpus}")
        _require(0 <= d.min_margin <= 1, "data.min_margin", f"must be in [0, 1], got {d.min_margin}")
        _require(d.request_retries >= 0, "data.request_retries", f"must be >= 0, got {d.request_retries}")
        _require(d.memory_mb >= 0, "data.memory_mb", f"must be >= 0, got {d.memory_mb}")


def judge_kind(cfg) -> str:
    """The run's one external judge: judge.kind; else the gate's (gate.judge, when it audits); else the VLM when
    judge.model names one; else the shapes oracle (as before the VLM judge existed)."""
    j = cfg.judge
    if j.kind is not None:
        return j.kind
    gate = cfg.gate.judge if "gate" in cfg else "none"
    if gate != "none":
        return gate
    return "vlm" if j.model else "oracle"


def check_judge(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.kind is not None:
        _choice("judge.kind", j.kind, JUDGE_KINDS)
    if "gate" in cfg:
        _choice("gate.judge", cfg.gate.judge, GATE_JUDGES)
    kind = judge_kind(cfg)
    if "gate" in cfg:
        _require(cfg.gate.judge in ("none", kind), "gate.judge",
                 f"'{cfg.gate.judge}' is not the run's external judge (judge.kind={kind}): the gate audits with "
                 f"that one; set gate.judge={kind}" + (" or gate.judge=none" if kind != "none" else ""))
    if kind == "vlm":
        _require(bool(j.model), "judge.model", "the vlm judge needs a model: a hub id (e.g. "
                 "judge.model=Qwen/Qwen2.5-VL-7B-Instruct) or a save_pretrained directory")
        path = Path(j.model)
        looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", j.model) is not None and not path.exists()
        _require(path.exists() or looks_like_hub_id, "judge.model",
                 f"'{j.model}' is neither a directory nor a hub id (org/name)")
        _require(not path.exists() or (path / "config.json").is_file(), "judge.model",
                 f"'{j.model}' has no config.json; point it at a save_pretrained directory")
    else:  # a judge.model the run would not use: say so instead of ignoring it
        vlm = "gate.judge=vlm" if "gate" in cfg and cfg.gate.judge != "none" and j.kind is None else "judge.kind=vlm"
        _require(j.model is None, "judge.model", f"is set ('{j.model}') but the external judge is {kind}: "
                 f"set {vlm}, or judge.model=null")
    _choice("judge.mode", j.mode, JUDGE_MODES)
    _choice("judge.dtype", j.dtype, DTYPES)
    _check_device("judge.device", j.device)
    _require(j.device_map in (None, "auto", "balanced", "sequential"), "judge.device_map",
             f"'{j.device_map}' is not null, auto, balanced or sequential")
    _require(j.batch_size >= 1, "judge.batch_size", f"must be >= 1, got {j.batch_size}")
    _require(0 <= j.threshold <= 1, "judge.threshold", f"must be in [0, 1], got {j.threshold}")
    _require(j.max_new_tokens >= 1, "judge.max_new_tokens", f"must be >= 1, got {j.max_new_tokens}")
    _require(j.num_gpus is None or j.num_gpus >= 0, "judge.num_gpus", f"must be >= 0 or null, got {j.num_gpus}")
    _require(j.num_replicas >= 1, "judge.num_replicas", f"must be >= 1, got {j.num_replicas}")
    _check_autoscaling("judge.autoscaling_config", j.autoscaling_config)


def head_resources(cfg) -> dict[str, float]:
    """The custom resources a Ray head started here advertises: every Ray Train worker's train.scaling.resources
    (a self-improvement run or a train job's `scaling`), so that a preset whose workers ask for gapray_train
    trains on this one machine as on a cluster's training nodes."""
    scaling = cfg.train.scaling if "train" in cfg else cfg.get("scaling")
    if scaling is None or not scaling.get("resources"):
        return {}
    return {k: float(v) * scaling.num_workers for k, v in scaling.resources.items()}


def worker_gpus(scaling) -> float:
    """The GPUs a Ray Train worker reserves: train.scaling.gpus_per_worker, else 1 with use_gpu."""
    return float(scaling.gpus_per_worker) if scaling.gpus_per_worker is not None else float(scaling.use_gpu)


def serve_released_for_training(cfg) -> bool:
    """Whether the driver deletes the Serve app before each training phase (serve.release_for_training)."""
    mode = cfg.serve.release_for_training
    if cfg.backend != "ray" or mode == "never" or "train" not in cfg:  # gapray measure trains nothing
        return False
    if mode == "always":
        return True
    return cfg.serve.num_gpus > 0 and cfg.train.backend == "ray" and worker_gpus(cfg.train.scaling) > 0


def check_serve(s: DictConfig) -> None:
    _require(s.num_replicas >= 1, "serve.num_replicas", f"must be >= 1, got {s.num_replicas}")
    _require(s.num_cpus >= 0 and s.num_gpus >= 0, "serve.num_cpus", "num_cpus and num_gpus must be >= 0")
    _require(s.max_batch_size is None or s.max_batch_size >= 2, "serve.max_batch_size",
             f"must be >= 2 model rows (one guided image is 2 rows), or null (sized by memory), got {s.max_batch_size}")
    _require(s.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", f"must be >= 0, got {s.batch_wait_timeout_s}")
    _require(s.max_ongoing_requests >= 1, "serve.max_ongoing_requests", f"must be >= 1, got {s.max_ongoing_requests}")
    _require(1 <= s.http_port <= 65535, "serve.http_port", f"must be a port number, got {s.http_port}")
    _choice("serve.release_for_training", s.release_for_training, ("auto", "always", "never"))
    _choice("serve.log_level", s.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    _require(s.route_prefix is None or s.route_prefix.startswith("/"), "serve.route_prefix",
             f"must start with '/' or be null, got '{s.route_prefix}'")
    _check_autoscaling("serve.autoscaling_config", s.autoscaling_config)


def _check_autoscaling(key: str, a) -> None:
    if a is not None:
        _require(0 <= a.min_replicas <= a.max_replicas and a.max_replicas >= 1, key,
                 f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1; got {a.min_replicas}..{a.max_replicas}")
        _require(a.target_ongoing_requests > 0, f"{key}.target_ongoing_requests", "must be > 0")


def check_self_improve(cfg: DictConfig) -> None:
    _choice("mode", cfg.mode, MODES)
    _require(cfg.rounds >= 1, "rounds", f"must be >= 1, got {cfg.rounds}")
    _require(cfg.eval_images_per_prompt >= 1, "eval_images_per_prompt", f"must be >= 1, got {cfg.eval_images_per_prompt}")
    _require(cfg.max_eval_prompts is None or cfg.max_eval_prompts >= 1, "max_eval_prompts", "must be >= 1 or null")
    for key in ("prompts", "eval_prompts", "composition_prompts"):
        _require(cfg[key] is None and key == "composition_prompts" or Path(cfg[key]).is_file(), key,
                 f"file '{cfg[key]}' not found (a GenEval .jsonl or a .txt prompt list)")
    if cfg.mode.startswith("c-"):
        e, r = cfg.train.epochs, cfg.replay_epoch
        _require(e >= 2, "train.epochs", f"{cfg.mode} replays the discard pool between epochs: needs >= 2, got {e}")
        _require(r is None or 1 <= r < e, "replay_epoch", f"must be in 1..{e - 1} (train.epochs - 1) or null, got {r}")
    _choice("gate.judge", cfg.gate.judge, GATE_JUDGES)  # with the judge it names: check_judge
    _require(cfg.gate.audit_size >= 1, "gate.audit_size", f"must be >= 1, got {cfg.gate.audit_size}")
    _require(0 <= cfg.gate.min_precision <= 1, "gate.min_precision", f"must be in [0, 1], got {cfg.gate.min_precision}")
    _choice("gate.on_fail", cfg.gate.on_fail, GATE_ACTIONS)
    check_corrupt_judge(cfg.corrupt_judge)
    check_recipe(cfg.train, prefix="train.")


def check_corrupt_judge(c: DictConfig) -> None:
    _choice("corrupt_judge.mode", c.mode, CORRUPTIONS)
    _require(0 <= c.rate <= 1, "corrupt_judge.rate", f"must be in [0, 1], got {c.rate}")


def check_reproduce(cfg: DictConfig) -> None:
    _require(len(cfg.seeds) >= 1 and len(set(cfg.seeds)) == len(cfg.seeds), "seeds", f"need distinct seeds, got {list(cfg.seeds)}")
    for m in cfg.modes:
        _choice("modes", m, MODES)
    _require(cfg.rounds >= 1, "rounds", f"must be >= 1, got {cfg.rounds}")
    check_corrupt_judge(cfg.corrupt_judge)
    for key in ("train_samples", "heldout_samples"):
        _require(cfg.diagnostic[key] >= 2, f"diagnostic.{key}", f"must be >= 2, got {cfg.diagnostic[key]}")


def check_train(cfg: DictConfig) -> None:
    _require(cfg.data != "", "data", "the preference directory is required: data=<dir with sft.parquet/dpo.parquet>")
    _choice("objective", cfg.objective, TRAIN_OBJECTIVES)
    check_recipe(cfg)


def check_recipe(cfg: DictConfig, prefix: str = "") -> None:
    """TrainRecipe's checks; `prefix` is where the recipe sits in the config (for the error line)."""
    def require(ok: bool, key: str, what: str) -> None:
        _require(ok, prefix + key, what)

    def choice(key: str, value, choices) -> None:
        _choice(prefix + key, value, choices)

    require(len(cfg.trainable) > 0, "trainable", f"name at least one of {', '.join(TRAINABLE_GROUPS)}")
    for group in cfg.trainable:
        choice("trainable", group, TRAINABLE_GROUPS)
    for key in ("epochs", "micro_batch_size", "gradient_accumulation_steps", "log_every_n_steps"):
        require(cfg[key] >= 1, key, f"must be >= 1, got {cfg[key]}")
    require(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", f"must be >= 1 or null, got {cfg.max_steps}")
    require(cfg.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {cfg.shuffle_buffer}")
    require(cfg.max_failures >= -1, "max_failures", f"must be >= 0 (-1: unlimited), got {cfg.max_failures}")
    choice("backend", cfg.backend, TRAIN_BACKENDS)
    loss = cfg.loss
    require(loss.beta > 0, "loss.beta", f"must be > 0, got {loss.beta}")
    choice("loss.loss_type", loss.loss_type, DPO_LOSS_TYPES)
    require(0 <= loss.label_smoothing < 0.5, "loss.label_smoothing", f"must be in [0, 0.5), got {loss.label_smoothing}")
    require(0 <= loss.uncond_prob < 1, "loss.uncond_prob", f"must be in [0, 1), got {loss.uncond_prob}")
    require(loss.rpo_alpha is None or loss.rpo_alpha >= 0, "loss.rpo_alpha", f"must be >= 0 or null, got {loss.rpo_alpha}")
    choice("loss.reference", loss.reference, REFERENCES)
    o = cfg.optim
    require(o.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    choice("optim.lr_scheduler_type", o.lr_scheduler_type, LR_SCHEDULES)
    require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    require(o.max_grad_norm >= 0, "optim.max_grad_norm", f"must be >= 0 (0: no clipping), got {o.max_grad_norm}")
    require(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1", "adam betas must be in [0, 1)")
    ds = cfg.deepspeed
    choice("deepspeed.zero_stage", ds.zero_stage, (0, 1, 2, 3))
    require(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer", "needs zero_stage >= 1")
    require(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param", "needs zero_stage 3")
    require(cfg.scaling.num_workers >= 1, "scaling.num_workers", f"must be >= 1, got {cfg.scaling.num_workers}")
    require(cfg.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    g = cfg.scaling.gpus_per_worker
    require(g is None or (g >= 0 and (g == int(g) or not cfg.scaling.use_gpu)), "scaling.gpus_per_worker",
            f"must be null or >= 0, and whole with use_gpu (a DeepSpeed rank drives whole GPUs), got {g}")
    choice("scaling.placement_strategy", cfg.scaling.placement_strategy, ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"))
    for name, amount in cfg.scaling.resources.items():
        require(name not in ("CPU", "GPU", "memory") and amount > 0, "scaling.resources",
                f"'{name}: {amount}': name custom resources only (cpus_per_worker and gpus_per_worker reserve CPUs "
                f"and GPUs), each > 0")
    c = cfg.checkpoint
    require(c.every_n_steps is None or c.every_n_steps >= 1, "checkpoint.every_n_steps", "must be >= 1 or null")
    require(c.num_to_keep is None or c.num_to_keep >= 1, "checkpoint.num_to_keep", "must be >= 1 or null")
    for e in c.export_epochs:
        require(1 <= e <= cfg.epochs, "checkpoint.export_epochs", f"epoch {e} is not in 1..{cfg.epochs}")
