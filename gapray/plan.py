"""`gapray plan`: a per-GPU memory estimate of a self-improvement run, and the refusal of one that cannot fit.

    gapray plan experiment=janus-pro-7b cluster.gpu_memory_gb=24

Pure arithmetic, before any work: no Ray, no weights. The model's parameters are counted per submodule on
torch's meta device from its transformers config (config.json of a directory or of the hub cache; the
built-in names tiny, janus-pro-1b-random and shapes; for deepseek-community/Janus-Pro-1B and -7B without
the hub, their known architecture numbers), and every figure below is a function of those counts and the
run config. One GPU of each role that holds memory:

  training worker (train.backend=ray with scaling.use_gpu; DeepSpeed, gapray/train/deepspeed.py), W workers:
    weights      P x b                    (b: 2 with deepspeed.bf16, else model.dtype's bytes; / W at ZeRO-3)
    gradients    T x (b + 4)              (T: the `train.trainable` groups' parameters; with an fp32 master the
                 optimizer steps on an fp32 copy of them; / W at ZeRO >= 2)
    optimizer    T x 12: fp32 master + AdamW m, v (ZeRO 1-3 always keep an fp32 partition; stage 0: 12 with
                 bf16, else m, v in the weights' dtype), / W at ZeRO >= 1; 0 with offload_optimizer (CPU RAM)
    ZeRO buffers the reduce bucket, min(5e8, T) x b (stages 1-3), + at ZeRO-3 the gathered working set
                 (the largest submodule + the 5e7 prefetch bucket) x b
    reference    P x b: DPO with a frozen reference (mode c-dpo, or dpo without data.ref_logprobs). Never
                 partitioned: gapray/train/loop.py moves a full copy onto every worker's device, at any stage
    activations  per sequence of s = PROMPT_TOKENS + image tokens (a DPO row is 2 sequences), per layer
                 and token 2 (4h + 2bh) + b (2h + 2 kv d + 4i): what transformers' Llama layer saves with SDPA
                 (no s^2 term; layer_activation_bytes), + the final norm's 4h + bh; gradient checkpointing
                 keeps b h per layer (its input) + one layer's worth (recomputed in backward) + the final norm
    logits       the generation head: image tokens x (codebook x (b + 8) + 2 x head width x b) per sequence
  serve replica (backend=ray: a ModelServer; backend=local: the driver's sampler), one batch at a time:
    weights      P x model.dtype's bytes
    KV cache     kv_bytes_per_row x rows: 2 x layers x kv heads x head dim x bytes x (PROMPT_TOKENS + image
                 tokens) per row (the sampler's StaticCache), rows = serve.max_batch_size (model rows: a
                 guided image is 2; null: each replica takes what fits its device at start, memory_batch_rows,
                 and the plan counts the most that fit); with model.compile, rows round up to the batch bucket
    VQ decode    a score batch decodes max_batch_size images: 4 x image_size^2 x the decoder's top channels x
                 bytes each (its largest feature maps alive at once); the larger of the two batches counts
  judge replica (a VLM judge's JudgeServer, gapray/serve/judge.py; judge.num_replicas x judge.num_gpus): its
    weights, counted from a local config.json (else unknown)
  every role: + OVERHEAD_GIB (CUDA context, NCCL, allocator) + OVERHEAD_FRACTION of the rest.

A GPU's memory is `cluster.gpu_memory_gb` (GiB, 2^30 bytes, as nvidia-smi and torch report a GPU's total: 80 for
an A100 80GB, 79.6 for an H100 80GB, 22.5 for an A10G or L4 "24 GB"), else this machine's CUDA device, else
unknown (the table only). A fractional num_gpus shares one GPU: its share of the memory is the budget.
`kv_bytes_per_row`, `serve_row_bytes` and `max_batch_rows` are public: Serve batch sizing (memory_batch_rows, on
a replica's device_free_bytes) uses them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from gapray.errors import UserError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROMPT_TOKENS = 64  # text tokens per row assumed: a GenEval prompt in Janus' chat template is ~20-40
OVERHEAD_GIB = 1.0  # per GPU: CUDA context, NCCL communicators, allocator slack
OVERHEAD_FRACTION = 0.10  # fragmentation and transient copies, of everything else
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements)
PREFETCH_BUCKET = 5e7  # DeepSpeed's default stage3_prefetch_bucket_size (elements)
DECODE_MAPS = 4  # VQ decoder feature maps at full resolution alive at once (no grad)
# submodules of JanusForConditionalGeneration counted apart (model.* and the text head)
GROUPS = ("language_model", "vision_model", "aligner", "vqmodel", "generation_embeddings", "generation_aligner",
          "generation_head", "lm_head")


# ---- the model's numbers ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    """What the plan reads of a Janus model: parameter counts per submodule and the shapes memory scales with."""
    source: str  # where the numbers come from, for the table's head
    params: dict  # submodule -> parameters (GROUPS; "other" for the rest)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    image_tokens: int
    codebook: int
    head_embed: int  # the generation head's hidden width (vq_config.image_token_embed_dim)
    image_size: int
    decoder_channels: int  # the VQ decoder's channels at full resolution
    largest_module: int  # parameters of the largest leaf module (ZeRO-3 gathers one at a time)

    @property
    def total(self) -> int:
        return sum(self.params.values())

    def trainable(self, groups) -> int:
        return sum(self.params.get(g, 0) for g in groups)


def count_params(config) -> tuple[dict, int]:
    """(parameters per submodule, the largest leaf module's) of a JanusConfig: the model built on torch's meta
    device (no memory, ~0.1 s for 7B)."""
    import torch
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    parts = {name: getattr(model.model, name, None) for name in GROUPS}
    parts["lm_head"] = model.lm_head
    seen, params = set(), {}
    for name, module in parts.items():
        if module is None:
            continue
        ps = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        params[name] = sum(p.numel() for p in ps)
    params["other"] = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return params, largest


def arch_from_config(config, source: str) -> Arch:
    """An Arch of a transformers JanusConfig (or a save_pretrained directory's config.json, loaded)."""
    t, v, q = config.text_config, config.vision_config, config.vq_config
    params, largest = count_params(config)
    heads = t.num_attention_heads
    grid = v.image_size // v.patch_size
    return Arch(source=source, params=params, layers=t.num_hidden_layers, hidden=t.hidden_size,
                intermediate=t.intermediate_size, heads=heads, kv_heads=getattr(t, "num_key_value_heads", None) or heads,
                head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
                image_tokens=getattr(v, "num_image_tokens", None) or grid * grid, codebook=q.num_embeddings,
                head_embed=q.image_token_embed_dim, image_size=v.image_size,
                decoder_channels=q.base_channels * q.channel_multiplier[0], largest_module=largest)


def known_janus_pro(size: str):
    """The JanusConfig of deepseek-community/Janus-Pro-{1B,7B} from their architecture numbers (Janus-Pro report,
    Table 1; shared/notes/janus.md 1.1): DeepSeek-LLM 1.5B/7B, SigLIP-L/16 at 384 px, the 16,384-code VQ."""
    from transformers import JanusConfig

    h, layers, heads, inter = {"1B": (2048, 24, 16, 5632), "7B": (4096, 30, 32, 11008)}[size]
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=102400, hidden_size=h, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=16384),
        vision_config=dict(projection_dim=h), vq_config=dict(projection_dim=h, image_token_embed_dim=h),
        image_token_id=100581 if size == "1B" else 100594, tie_word_embeddings=False)


KNOWN = {"deepseek-community/Janus-Pro-1B": "1B", "deepseek-community/Janus-Pro-7B": "7B"}


def cached_config(path: str) -> Path | None:
    """config.json of a hub id in the local hub cache (no network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a valid repo id, no cache
        return None
    return Path(found) if isinstance(found, str) else None


def model_arch(path: str) -> Arch | None:
    """The Arch of model.path (a built-in name, a directory, a hub id); None when its size cannot be known
    here (a hub id neither cached nor known)."""
    from gapray.config import SHIPPED_MODELS

    if path == "tiny":
        from gapray.models.builders import TINY, build_tokenizer, janus_config
        return arch_from_config(janus_config(vocab_size=len(build_tokenizer()), **TINY), "built-in tiny")
    if path == "janus-pro-1b-random":
        from gapray.models.builders import JANUS_PRO_1B, janus_config
        return arch_from_config(janus_config(vocab_size=102400, **JANUS_PRO_1B), "built-in janus-pro-1b-random")
    local = SHIPPED_MODELS.get(path, Path(path))
    config_json = local / "config.json" if local.is_dir() else cached_config(path)
    if config_json is not None and config_json.is_file():
        from transformers import JanusConfig

        return arch_from_config(JanusConfig.from_dict(json.loads(config_json.read_text())), str(config_json))
    if path in KNOWN:
        return arch_from_config(known_janus_pro(KNOWN[path]), "known architecture numbers; not in the hub cache")
    return None


def vlm_params(path: str | None) -> tuple[int | None, str]:
    """(parameters, where from) of a VLM judge from its config.json (a directory, or the hub cache); (None,
    why) when unknown."""
    if not path:
        return None, "no judge.model"
    local = Path(path)
    config_json = local / "config.json" if local.is_dir() else cached_config(path)
    if config_json is None or not config_json.is_file():
        return None, f"'{path}' is a hub id not in the local hub cache: its size is unknown here (point " \
                     f"judge.model at a local directory, or `hf download {path} config.json`, to count it)"
    try:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(str(config_json.parent))
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        return sum(p.numel() for p in model.parameters()), str(config_json)
    except Exception as e:  # an architecture this transformers does not know
        return None, f"{config_json}: not countable ({type(e).__name__})"


# ---- the public arithmetic (Serve batch sizing reuses these) -------------------------------------------------------
def kv_bytes_per_row(*, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int) -> int:
    """Bytes of KV cache one model row holds: keys and values (2) of every layer, kv_heads x head_dim each, for
    `tokens` positions (a sample row: prompt + image tokens), in the cache's dtype (the model's)."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes * tokens


def with_overhead(nbytes: float) -> float:
    """What `nbytes` of tensors take on a GPU: + OVERHEAD_FRACTION of them + OVERHEAD_GIB."""
    return nbytes * (1 + OVERHEAD_FRACTION) + OVERHEAD_GIB * GiB


def max_batch_rows(gpu_bytes: float, *, weight_bytes: float, row_bytes: float, other_bytes: float = 0.0) -> int:
    """The most model rows a replica can batch in `gpu_bytes` of GPU memory: weights + other_bytes + rows x
    row_bytes (kv_bytes_per_row, or a serve row's larger working set: `serve_row_bytes`) with the plan's
    overhead (with_overhead) within the memory; 0 when even the weights do not fit."""
    free = (gpu_bytes - OVERHEAD_GIB * GiB) / (1 + OVERHEAD_FRACTION) - weight_bytes - other_bytes
    return max(0, int(free // row_bytes)) if row_bytes > 0 else 0


def serve_row_bytes(arch: Arch, dtype_bytes: int, prompt_tokens: int = PROMPT_TOKENS) -> tuple[int, int]:
    """(sample row: its KV cache, score row: one image's VQ decode) in bytes."""
    kv = kv_bytes_per_row(layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim, dtype_bytes=dtype_bytes,
                          tokens=prompt_tokens + arch.image_tokens)
    decode = DECODE_MAPS * arch.image_size**2 * arch.decoder_channels * dtype_bytes
    return kv, decode


def rows_in_memory(config, dtype_bytes: int, free_bytes: float) -> int:
    """The model rows a loaded model (its JanusConfig, weights in `dtype_bytes`) can batch in the `free_bytes` its
    device has left with the weights in place: one row costs the larger of a sample row's KV cache and a score
    row's VQ decode (serve_row_bytes), the plan's overhead kept aside (max_batch_rows)."""
    kv, decode = serve_row_bytes(arch_from_config(config, "the loaded model"), dtype_bytes)
    return max_batch_rows(free_bytes, weight_bytes=0, row_bytes=max(kv, decode))


def memory_batch_rows(model, gpu_share: float = 1.0) -> int:
    """serve.max_batch_size=null: the model rows a loaded JanusModel batches, from what its device has free now
    (device_free_bytes); a device that cannot hold one guided image (2 rows) is refused in one line."""
    free = device_free_bytes(model.device, gpu_share)
    rows = rows_in_memory(model.model.config, model.model.dtype.itemsize, free)
    if rows < 2:
        raise UserError(f"serve.max_batch_size=null: {model.device} has {free / GiB:.2f} GiB free with the weights "
                        f"loaded, not enough for one guided image (2 model rows); set serve.max_batch_size, or give "
                        f"each replica more memory (serve.num_gpus)")
    return rows


def device_free_bytes(device, gpu_share: float = 1.0) -> float:
    """The memory this process may still take on `device`: a GPU's free memory, within the process's share of the
    card when replicas share it (0 < serve.num_gpus < 1: share x total, less what this process holds already);
    the host's available memory (MemAvailable) on a CPU."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if 0 < gpu_share < 1:
            free = min(free, gpu_share * total - torch.cuda.memory_reserved(device))
        return max(0.0, float(free))
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024.0
    except (OSError, StopIteration):  # not Linux
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def zero_partition(nbytes: float, workers: int, stage: int, level: int) -> float:
    """`nbytes` per worker: divided over the workers from ZeRO stage `level` on (1: optimizer states,
    2: + gradients, 3: + weights), whole below it."""
    return nbytes / workers if stage >= level else nbytes


def norm_activation_bytes(arch: Arch, act_bytes: int) -> int:
    """What an RMSNorm saves per token: its fp32 input (4h), the normalised input in the model's dtype and its
    output (the next Linear's input), b h each."""
    return 4 * arch.hidden + 2 * act_bytes * arch.hidden


def layer_activation_bytes(arch: Arch, act_bytes: int) -> int:
    """What one Llama decoder layer saves per token for backward (transformers' LlamaDecoderLayer, SDPA: no s^2
    term, measured in tests/test_plan.py): two RMSNorms; attention b (2h + 2 kv d): the rotated q and k, v, the
    attention output; the MLP 4 b i: gate, up, act(gate) and their product."""
    return 2 * norm_activation_bytes(arch, act_bytes) + act_bytes * (
        2 * arch.hidden + 2 * arch.kv_heads * arch.head_dim + 4 * arch.intermediate)


# ---- the plan ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Part:
    name: str
    nbytes: float
    how: str
    counted: bool = True  # False: shown, but the larger alternative counts (serve: one batch at a time)


@dataclasses.dataclass
class Role:
    name: str  # "training worker"
    count: str  # "8 workers x 1 GPU"
    parts: list = dataclasses.field(default_factory=list)
    budget: float | None = None  # bytes of GPU memory it may use; None: unknown
    unknown: str = ""  # why the estimate is missing (the judge of a hub id)
    notes: list = dataclasses.field(default_factory=list)
    fixes: list = dataclasses.field(default_factory=list)  # config changes that would make it fit

    @property
    def total(self) -> float:
        return with_overhead(sum(p.nbytes for p in self.parts if p.counted))

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None or self.unknown else self.total <= self.budget


@dataclasses.dataclass
class Plan:
    model: str
    arch: Arch
    gpu_bytes: float | None
    gpu_source: str
    roles: list
    trainable: str = ""  # "6.49B trainable (language_model)"

    def refusal(self) -> str | None:
        """One line naming the first role that cannot fit, its estimate, the GPU memory and the fixes; None if all fit."""
        for r in self.roles:
            if r.fits is False:
                big = sorted((p for p in r.parts if p.counted), key=lambda p: -p.nbytes)[:3]
                top = ", ".join(f"{p.name} {p.nbytes / GiB:.1f}" for p in big)
                fix = "; ".join(r.fixes) if r.fixes else "a GPU with more memory"
                return (f"{r.name} ({r.count}) needs ~{r.total / GiB:.1f} GiB per GPU ({top} GiB, + overhead) but has "
                        f"{r.budget / GiB:.1f} GiB ({self.gpu_source}): it would run out of memory. Fits with: {fix}")
        return None


def gpu_memory(cfg) -> tuple[float | None, str]:
    """(bytes of one GPU, where from): cluster.gpu_memory_gb, else this machine's CUDA device 0, else None."""
    gb = cfg.cluster.gpu_memory_gb
    if gb is not None:
        if not gb > 0:
            raise UserError(f"config key 'cluster.gpu_memory_gb': must be > 0 (GiB per GPU) or null, got {gb}")
        return gb * GiB, f"cluster.gpu_memory_gb={gb:g}"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return float(props.total_memory), f"this machine's {props.name}; set cluster.gpu_memory_gb for the cluster's"
    except Exception:
        pass
    return None, "unknown: no cluster.gpu_memory_gb and no CUDA device here"


def plan_self_improve(cfg, arch: Arch | None = None, gpu: tuple[float | None, str] | None = None) -> Plan:
    """The per-GPU memory plan of a SelfImproveConfig (a DictConfig from load_config)."""
    from gapray.config import judge_kind

    arch = arch or model_arch(cfg.model.path)
    if arch is None:
        raise UserError(f"model.path: '{cfg.model.path}' is a hub id not in the local hub cache and not a known "
                        f"Janus-Pro; gapray plan needs its config.json: point model.path at a local directory, or "
                        f"`hf download {cfg.model.path} config.json`")
    gpu_bytes, source = gpu if gpu is not None else gpu_memory(cfg)
    roles = []
    t = cfg.train
    on_gpu_auto = gpu_bytes is not None  # device=auto: a GPU when there is one to plan for
    if (t.backend == "ray" and t.scaling.use_gpu) or (t.backend == "local" and _on_gpu(cfg.model.device, on_gpu_auto)):
        roles.append(training_role(cfg, arch, gpu_bytes))
    serve_gpus = cfg.serve.num_gpus if cfg.backend == "ray" else 1.0
    if (cfg.backend == "ray" and (cfg.serve.num_gpus > 0 or cfg.model.device.startswith("cuda"))) or \
            (cfg.backend == "local" and _on_gpu(cfg.model.device, on_gpu_auto)):
        roles.append(serve_role(cfg, arch, _share(gpu_bytes, serve_gpus or 1.0)))
    if judge_kind(cfg) == "vlm":
        j = cfg.judge
        gpus = (cfg.serve.num_gpus if j.num_gpus is None else j.num_gpus) if cfg.backend == "ray" else 1.0
        if (cfg.backend == "ray" and gpus > 0) or (cfg.backend == "local" and _on_gpu(j.device, on_gpu_auto)):
            roles.append(judge_role(cfg, gpu_bytes, gpus))
    trainable = f"{params_str(arch.trainable(t.trainable))} trainable ({', '.join(t.trainable)})"
    return Plan(model=cfg.model.path, arch=arch, gpu_bytes=gpu_bytes, gpu_source=source, roles=roles,
                trainable=trainable)


def _on_gpu(device: str, auto: bool) -> bool:
    return device.startswith("cuda") or (device == "auto" and auto)


def _share(gpu_bytes: float | None, gpus: float) -> float | None:
    """A fractional GPU shares one GPU's memory; a whole one (or more) holds the model on one device."""
    return None if gpu_bytes is None else gpu_bytes * min(1.0, gpus)


def training_precision(cfg) -> tuple[int, bool]:
    """(bytes of a weight while training, whether an fp32 master copy is kept)."""
    t = cfg.train
    model_bytes = DTYPE_BYTES[cfg.model.dtype]
    if t.backend == "local":  # torch's AdamW on the model's own parameters (preflight refuses 16-bit ones)
        return model_bytes, False
    bf16 = t.scaling.use_gpu if t.deepspeed.bf16 is None else t.deepspeed.bf16
    if bf16:
        return 2, True  # DeepSpeed casts the module to bf16; ZeRO/BF16 optimizers step an fp32 copy
    return model_bytes, t.deepspeed.zero_stage >= 1  # ZeRO 1-3 clone an fp32 partition whatever the dtype


def reference_held(cfg) -> bool:
    """Whether a DPO phase trains beside a frozen reference model (gapray/curriculum.py's _train): c-dpo's replay
    part always, dpo's parts unless data.ref_logprobs puts the reference log-probs in the data."""
    return cfg.mode == "c-dpo" or (cfg.mode == "dpo" and not cfg.data.ref_logprobs)


def training_role(cfg, arch: Arch, gpu_bytes: float | None) -> Role:
    t, ds = cfg.train, cfg.train.deepspeed
    ray = t.backend == "ray"
    w = t.scaling.num_workers if ray else 1
    stage = ds.zero_stage if ray else 0
    b, master = training_precision(cfg)
    P, T = arch.total, arch.trainable(t.trainable)
    dpo = cfg.mode.endswith("dpo")
    name = "training worker" if ray else "training (train.backend=local)"
    role = Role(name, f"{w} workers x 1 GPU, ZeRO-{stage}" if ray else "the driver's device", budget=gpu_bytes)
    where = f" / {w} workers" if w > 1 else ""
    role.parts.append(Part("weights", zero_partition(P * b, w, stage, 3) * (not (ray and ds.offload_param)),
                           f"{params_str(P)} params x {b} B" + (where if stage >= 3 else "")
                           + (" (offload_param: in CPU RAM)" if ray and ds.offload_param else "")))
    g = b + 4 if master else b  # + the fp32 copy the optimizer steps on (ZeRO's fp32 partition, FP16_Optimizer's)
    role.parts.append(Part("gradients", zero_partition(T * g, w, stage, 2),
                           f"{params_str(T)} trainable x {g} B ({f'{b} B + its fp32 copy' if master else 'weights dtype'})"
                           + (where if stage >= 2 else "")))
    per = 12 if master else 2 * b
    opt = zero_partition(T * per, w, stage, 1)
    offload = ray and ds.offload_optimizer
    role.parts.append(Part("optimizer states", 0.0 if offload else opt,
                           f"{params_str(T)} x {per} B ({'fp32 master + ' if master else ''}AdamW m, v)"
                           + (where if stage >= 1 else "") + (" (offload_optimizer: in CPU RAM)" if offload else "")))
    if offload:
        role.notes.append(f"offload_optimizer keeps {opt / GiB:.1f} GiB of optimizer states per worker in CPU RAM")
    if ray and stage >= 1:
        buf = min(REDUCE_BUCKET, T) * b
        how = f"reduce bucket min(5e8, T) x {b} B"
        if stage == 3:
            buf += (arch.largest_module + PREFETCH_BUCKET) * b
            how += f" + gathered {params_str(arch.largest_module)} (largest module) + 5e7 prefetch"
        role.parts.append(Part("ZeRO buffers", buf, how))
    if dpo and reference_held(cfg):
        role.parts.append(Part("reference model", P * b, f"frozen full copy, {params_str(P)} x {b} B (not partitioned)"))
    seqs = t.micro_batch_size * (2 if dpo else 1)
    s = PROMPT_TOKENS + arch.image_tokens
    lm_grad = any(g in t.trainable for g in ("language_model", "generation_embeddings", "generation_aligner"))
    # the final norm: its fp32 input and normalised input (its output feeds the frozen head, which saves none)
    per_layer, final_norm = layer_activation_bytes(arch, b), 4 * arch.hidden + b * arch.hidden
    if lm_grad:
        if t.gradient_checkpointing:  # the layer inputs, + one layer's saved tensors while backward recomputes it
            acts = (arch.layers * arch.hidden * b + per_layer + final_norm) * s * seqs
            how = (f"{seqs} seq x {s} tok x ({arch.layers} layer inputs x {arch.hidden * b} B + one layer's "
                   f"{per_layer / 1024:.1f} KiB) (checkpointing)")
        else:
            acts = (arch.layers * per_layer + final_norm) * s * seqs
            how = f"{seqs} seq x {s} tok x {arch.layers} layers x {per_layer / 1024:.1f} KiB"
        role.parts.append(Part("activations", acts, how))
    head = seqs * arch.image_tokens * (arch.codebook * (b + 8) + 2 * arch.head_embed * b)
    role.parts.append(Part("logits", head, f"{seqs} seq x {arch.image_tokens} x {arch.codebook} codes x {b + 8} B"))
    if ray and t.scaling.gpus_per_worker is not None and t.scaling.gpus_per_worker > 1:
        role.notes.append(f"gpus_per_worker={t.scaling.gpus_per_worker:g}: a rank computes on one of them; the others "
                          f"hold nothing")
    if gpu_bytes is not None and role.total > gpu_bytes:
        role.fixes = training_fixes(cfg, arch, gpu_bytes)
    return role


def training_fixes(cfg, arch: Arch, gpu_bytes: float) -> list[str]:
    """Single config changes after which the training worker fits (tried in the plan's own arithmetic)."""
    from omegaconf import OmegaConf

    t, ds = cfg.train, cfg.train.deepspeed
    tries = []
    if t.backend == "ray":
        tries += [f"train.deepspeed.zero_stage={s}" for s in range(ds.zero_stage + 1, 4)]
    if not t.gradient_checkpointing:
        tries.append("train.gradient_checkpointing=true")
    if t.micro_batch_size > 1:
        tries.append("train.micro_batch_size=1 (raise gradient_accumulation_steps to keep the batch)")
    if t.backend == "ray" and not ds.offload_optimizer:
        tries.append("train.deepspeed.offload_optimizer=true" + (" zero_stage=1" if ds.zero_stage == 0 else ""))
    if t.backend == "ray" and not ds.offload_param:
        tries.append("train.deepspeed.offload_param=true zero_stage=3 offload_optimizer=true")
    fixes = []
    for fix in tries:
        keys = fix.split(" (")[0].split()
        dot = [keys[0]] + [f"train.deepspeed.{k}" for k in keys[1:]]
        if _trained_fits(OmegaConf.merge(cfg, OmegaConf.from_dotlist(dot)), arch, gpu_bytes):
            fixes.append(fix)
    if t.backend == "ray" and ds.zero_stage >= 1:
        for w in (2, 4, 8, 16, 32, 64, 128):
            if w > t.scaling.num_workers and _trained_fits(
                    OmegaConf.merge(cfg, {"train": {"scaling": {"num_workers": w}}}), arch, gpu_bytes):
                fixes.append(f"train.scaling.num_workers={w} (more GPUs)")
                break
    return fixes + ["a GPU with more memory"]


def _trained_fits(cfg, arch: Arch, gpu_bytes: float) -> bool:
    role = training_role(cfg, arch, None)
    return role.total <= gpu_bytes


def serve_role(cfg, arch: Arch, budget: float | None) -> Role:
    from gapray.models.sampler import bucket_rows

    ray = cfg.backend == "ray"
    b = DTYPE_BYTES[cfg.model.dtype]
    guided = cfg.sampling.guidance_scale != 1.0
    per_image = 2 if guided else 1
    kv_row, decode_image = serve_row_bytes(arch, b)
    P = arch.total
    most = None if budget is None else max_batch_rows(budget, weight_bytes=P * b, row_bytes=max(kv_row, decode_image))
    if ray:
        rows = cfg.serve.max_batch_size
        if rows is None:  # the replicas size their batches from their memory: the most that fit counts
            rows = max(most or 0, 2)
        images = rows  # a score batch: one row per image
        a = cfg.serve.autoscaling_config
        n = f"{a.min_replicas}-{a.max_replicas}" if a is not None else f"{cfg.serve.num_replicas}"
        count = f"{n} replica{'s' if n != '1' else ''} x {cfg.serve.num_gpus:g} GPU"
        name = "serve replica"
    else:
        images = cfg.batch_prompts * max(cfg.images_per_prompt, cfg.eval_images_per_prompt)
        rows = images * per_image
        count, name = "the driver's device", "sampler (backend=local)"
    cache_rows = bucket_rows(rows) if cfg.model.compile else rows
    kv, decode = kv_row * cache_rows, decode_image * images
    role = Role(name, count, budget=budget)
    role.parts.append(Part("weights", P * b, f"{params_str(P)} params x {b} B ({cfg.model.dtype})"))
    role.parts.append(Part("KV cache (sample batch)", kv,
                           f"{cache_rows} rows x {kv_row / 2**20:.1f} MiB (2 x {arch.layers} layers x {arch.kv_heads} x "
                           f"{arch.head_dim} x {b} B x {PROMPT_TOKENS}+{arch.image_tokens} tok)", counted=kv >= decode))
    role.parts.append(Part("VQ decode (score batch)", decode,
                           f"{images} images x {decode_image / 2**20:.1f} MiB ({DECODE_MAPS} maps of {arch.image_size}^2 "
                           f"x {arch.decoder_channels} ch)", counted=decode > kv))
    role.notes.append("serve: one batch at a time (the replica's lock): the larger of the sample and score batch counts")
    if ray and cfg.serve.max_batch_size is None:
        role.notes.append("serve: serve.max_batch_size=null: each replica batches as many rows as its device's free "
                          "memory holds once its weights are loaded" + ("" if most is None else f" (here {most})"))
    if ray and budget is not None:
        role.notes.append(f"serve: at most {most} model rows per batch fit this GPU ({most // per_image} "
                          f"{'guided ' if guided else ''}images; serve.max_batch_size="
                          f"{'null' if cfg.serve.max_batch_size is None else cfg.serve.max_batch_size} now)")
        if role.total > budget:
            role.fixes = ([f"serve.max_batch_size={most}"] if most >= 2 else []) + \
                ([f"model.dtype=bfloat16 (weights {P * 4 / GiB:.1f} -> {P * 2 / GiB:.1f} GiB)"] if b == 4 else []) + \
                ["a GPU with more memory"]
    elif budget is not None and role.total > budget:
        role.fixes = ["lower batch_prompts", "a GPU with more memory"]
    return role


def judge_role(cfg, gpu_bytes: float | None, gpus: float) -> Role:
    j = cfg.judge
    n, source = vlm_params(j.model)
    sharded = j.device_map is not None and gpus > 1
    budget = None if gpu_bytes is None else (gpu_bytes * gpus if sharded else _share(gpu_bytes, gpus))
    ja = j.get("autoscaling_config")
    replicas = f"{j.num_replicas}" if ja is None else f"{ja.min_replicas}-{ja.max_replicas}"
    count = f"{replicas} replica{'s' if replicas != '1' else ''} x {gpus:g} GPU" if cfg.backend == "ray" else "judge.device"
    role = Role("judge replica", count, budget=budget)
    if n is None:
        role.unknown = source
        return role
    b = DTYPE_BYTES[j.dtype]
    role.parts.append(Part("weights", n * b, f"{params_str(n)} params x {b} B ({j.dtype})"
                           + (f", sharded over {gpus:g} GPUs (judge.device_map)" if sharded else "")))
    role.notes.append(f"judge: activations of judge.batch_size={j.batch_size} images are not counted beyond the overhead")
    if budget is not None and role.total > budget:
        role.fixes = ["judge.device_map=auto with judge.num_gpus >= 2", "a smaller judge.model", "a GPU with more memory"]
    return role


# ---- the table -------------------------------------------------------------------------------------------------------
def params_str(n: float) -> str:
    """2.08B, 2.3M, 12K: a parameter count for the table."""
    return next(f"{n / d:.2f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                if n >= d or d == 1)


def format_plan(plan: Plan) -> str:
    a = plan.arch
    lines = [f"model {plan.model}: {params_str(a.total)} parameters, {plan.trainable}; {a.layers} layers x "
             f"{a.hidden}, {a.image_tokens} image tokens ({a.source})",
             f"GPU memory: {'%.1f GiB' % (plan.gpu_bytes / GiB) if plan.gpu_bytes else '-'} per GPU ({plan.gpu_source})",
             f"assumed: {PROMPT_TOKENS} prompt tokens per row; overhead {OVERHEAD_GIB:g} GiB + "
             f"{OVERHEAD_FRACTION:.0%} per GPU; GiB = 2^30 bytes"]
    if not plan.roles:
        return "\n".join(lines + ["no role holds GPU memory (everything runs on CPUs)"])
    names = []
    for r in plan.roles:
        for p in r.parts:
            if p.name not in names:
                names.append(p.name)
    width = max(24, *(len(r.name) + 2 for r in plan.roles))
    label = max(len(n) for n in [*names, "GPU memory"]) + 2
    lines += ["", " " * label + "".join(f"{r.name:>{width}}" for r in plan.roles),
              " " * label + "".join(f"{r.count:>{width}}" for r in plan.roles)]

    def cell(r: Role, name: str) -> str:
        p = next((p for p in r.parts if p.name == name), None)
        if p is None:
            return "-"
        return f"{p.nbytes / GiB:.2f}" if p.counted else f"({p.nbytes / GiB:.2f})"

    for name in names:
        lines.append(f"{name:<{label}}" + "".join(f"{cell(r, name):>{width}}" for r in plan.roles))
    lines.append(f"{'overhead':<{label}}" + "".join(
        f"{('-' if r.unknown else '%.2f' % ((r.total - sum(p.nbytes for p in r.parts if p.counted)) / GiB)):>{width}}"
        for r in plan.roles))
    lines.append(f"{'total':<{label}}" + "".join(
        f"{('unknown' if r.unknown else '%.2f' % (r.total / GiB)):>{width}}" for r in plan.roles))
    lines.append(f"{'GPU memory':<{label}}" + "".join(
        f"{('-' if r.budget is None else '%.2f' % (r.budget / GiB)):>{width}}" for r in plan.roles))
    lines.append(f"{'fits':<{label}}" + "".join(f"{_verdict(r):>{width}}" for r in plan.roles))
    lines.append("")
    for r in plan.roles:
        if r.unknown:
            lines.append(f"{r.name}: not estimated: {r.unknown}")
        for p in r.parts:
            lines.append(f"  {r.name} / {p.name}: {p.how}")
        lines += [f"  {n}" for n in r.notes]
    return "\n".join(lines)


def _verdict(r: Role) -> str:
    if r.fits is None:
        return "unknown" if r.unknown else "no check"
    return f"yes ({(r.budget - r.total) / GiB:.1f} free)" if r.fits else f"NO (+{(r.total - r.budget) / GiB:.1f})"


def checkpoint_bytes(cfg, arch: Arch) -> float:
    """One sealed training checkpoint on disk, all ranks together (gapray/train/checkpoint.py: DeepSpeed's shards):
    the weights in their training dtype once, and for the trainable parameters an fp32 copy and AdamW's m and v
    (ZeRO partitions them over the ranks; the sum stays). Stage 0 without an fp32 master keeps m and v only."""
    b, master = training_precision(cfg)
    trainable = arch.trainable(cfg.train.trainable)
    return arch.total * b + trainable * (12 if master else 2 * b)


def run_dir_bytes(cfg, arch: Arch) -> tuple[float, str]:
    """What a self-improvement run writes into run_dir at most, and how: per training part (c- modes train twice
    a round) the checkpoints Ray keeps (train.checkpoint.num_to_keep, + the one being written) with
    train.backend=ray, and the exported models (save_pretrained, model.dtype), for every round. Ledgers and
    preference data are small beside them (image tokens only) and not counted."""
    t = cfg.train
    parts = cfg.rounds * (2 if cfg.mode.startswith("c-") else 1)
    export = arch.total * DTYPE_BYTES[cfg.model.dtype] * (1 + len(t.checkpoint.export_epochs))
    if t.backend != "ray":
        return parts * export, f"{parts} training parts x {export / GiB:.2f} GiB of exported models"
    keep = t.checkpoint.num_to_keep
    if keep is None:  # every checkpoint kept: at least one per epoch
        keep = t.epochs if t.checkpoint.every_n_steps is None else None
    ckpt = checkpoint_bytes(cfg, arch)
    if keep is None:
        return parts * (export + ckpt), (f"{parts} training parts x ({export / GiB:.2f} GiB exported + at least "
                                         f"{ckpt / GiB:.2f} GiB of checkpoints: num_to_keep=null keeps them all)")
    return parts * (export + (keep + 1) * ckpt), (f"{parts} training parts x ({export / GiB:.2f} GiB exported + "
                                                 f"{keep + 1} x {ckpt / GiB:.2f} GiB checkpoints)")


def check_fits(cfg) -> Plan | None:
    """The preflight's share: refuse (UserError, one line) a config a GPU of it cannot hold. Nothing is checked
    when the GPU memory is unknown or the model's size is (a hub id neither cached nor known)."""
    gpu = gpu_memory(cfg)
    if gpu[0] is None:
        return None
    try:
        arch = model_arch(cfg.model.path)
    except Exception:  # a config.json this transformers cannot read: load_model will say so
        arch = None
    if arch is None:
        return None
    plan = plan_self_improve(cfg, arch, gpu)
    line = plan.refusal()
    if line:
        raise UserError(f"memory: {line} (`gapray plan` prints the whole estimate)")
    return plan
