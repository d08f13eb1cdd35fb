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
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gapray.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BUILTIN_MODELS = ("tiny",)  # built from config in-process (random weights): tests and benchmarks
DTYPES = ("float32", "bfloat16", "float16")
SCORE_MODES = ("logits", "generate")
BACKENDS = ("local",)


@dataclass
class ModelConfig:
    path: str = "tiny"  # hub id (org/name), a save_pretrained directory, or a built-in name
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu


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
    max_new_tokens: int = 16  # generate mode only


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


def load_config(schema: type, yaml_path: str | Path | None = None, overrides: list[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, then value checks. Raises UserError."""
    cfg = OmegaConf.structured(schema)
    try:
        if yaml_path is not None:
            yaml_path = Path(yaml_path)
            if not yaml_path.is_file():
                raise UserError(f"config file '{yaml_path}' not found")
            cfg = OmegaConf.merge(cfg, _expand_presets(OmegaConf.load(yaml_path), schema))
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override '{item}' must look like key=value (e.g. images_per_prompt=8)")
        dot = OmegaConf.from_dotlist([_preset_override(o) for o in overrides if not _is_preset(o)])
        cfg = OmegaConf.merge(cfg, _expand_presets(dot, schema))
        for o in overrides:
            if _is_preset(o):
                key, name = o.split("=", 1)
                cfg = OmegaConf.merge(cfg, {key: OmegaConf.load(_preset_path(key, name))})
    except (ConfigKeyError, ValidationError) as e:
        raise UserError(_explain(e, schema)) from None
    except OmegaConfBaseException as e:
        raise UserError(f"config: {str(e).splitlines()[0]}") from None
    check_values(cfg)
    return cfg


def _preset_path(group: str, name: str) -> Path:
    return CONF_DIR / group / f"{name}.yaml"


def _is_preset(override: str) -> bool:
    """`model=janus-pro-1b` where conf/model/janus-pro-1b.yaml exists."""
    key, _, value = override.partition("=")
    return key == "model" and value != "" and _preset_path("model", value).is_file()


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
        if f is None or not is_dataclass(f.default_factory() if callable(f.default_factory) else None):
            return []
        cls = type(f.default_factory())
    return [f.name for f in fields(cls)]


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"config key '{key}': '{value}' is not one of {', '.join(map(str, choices))}{hint}")


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': {what}")


def check_values(cfg: DictConfig) -> None:
    """Range and choice checks the type system cannot express."""
    if "model" in cfg:
        _choice("model.dtype", cfg.model.dtype, DTYPES)
        _require(cfg.model.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.model.device) is not None,
                 "model.device", f"'{cfg.model.device}' is not auto, cpu, cuda or cuda:N")
    if "sampling" in cfg:
        s = cfg.sampling
        _require(s.guidance_scale > 1, "sampling.guidance_scale",
                 f"must be > 1 for classifier-free guidance (Janus-Pro uses 5), got {s.guidance_scale}")
        _require(s.temperature >= 0, "sampling.temperature", f"must be >= 0 (0 = greedy), got {s.temperature}")
        _require(s.top_k is None or s.top_k >= 1, "sampling.top_k", f"must be >= 1 or null, got {s.top_k}")
        _require(s.top_p is None or 0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1] or null, got {s.top_p}")
    if "scoring" in cfg:
        _choice("scoring.mode", cfg.scoring.mode, SCORE_MODES)
        _require(0 <= cfg.scoring.threshold <= 1, "scoring.threshold", f"must be in [0, 1], got {cfg.scoring.threshold}")
        _require(cfg.scoring.max_new_tokens >= 1, "scoring.max_new_tokens", "must be >= 1")
    if "images_per_prompt" in cfg:
        _require(cfg.images_per_prompt >= 1, "images_per_prompt", f"must be >= 1, got {cfg.images_per_prompt}")
    if "batch_prompts" in cfg:
        _require(cfg.batch_prompts >= 1, "batch_prompts", f"must be >= 1, got {cfg.batch_prompts}")
    if cfg.get("max_prompts") is not None:
        _require(cfg.max_prompts >= 1, "max_prompts", f"must be >= 1 or null, got {cfg.max_prompts}")
    if "backend" in cfg:
        _choice("backend", cfg.backend, BACKENDS)


def load_model(cfg: ModelConfig | DictConfig):
    """Build or load the configured model; a missing directory or unreachable hub id is a UserError."""
    from gapray.models import JanusModel

    if cfg.path in BUILTIN_MODELS:
        from gapray.models.builders import build_tiny_janus
        model, processor = build_tiny_janus()
        return JanusModel(model.to(cfg.device if cfg.device != "auto" else "cpu"), processor)
    path = Path(cfg.path)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.path) is not None and not path.exists()
    if not path.exists() and not looks_like_hub_id:
        raise UserError(f"model.path: '{cfg.path}' is neither a directory nor a hub id (org/name); "
                        f"presets: {', '.join(sorted(p.stem for p in (CONF_DIR / 'model').glob('*.yaml')))}")
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"model.path: '{cfg.path}' has no config.json; point it at a save_pretrained directory")
    try:  # the local cache first: no network round-trips when the model is already here
        return JanusModel.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, local_files_only=True)
    except OSError as e:
        if not looks_like_hub_id:
            raise UserError(f"model.path: could not load '{cfg.path}': {str(e).splitlines()[0][:200]}") from None
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one error line, not one warning per retry
    try:
        return JanusModel.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device)
    except OSError as e:
        raise UserError(f"model.path: could not load '{cfg.path}' from the hub or its local cache (is the hub "
                        f"reachable, the id right?): {str(e).splitlines()[0][:160]}") from None
