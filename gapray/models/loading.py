"""Loading a policy: the configured model built or loaded (a built-in name, the shipped shapes model, a directory,
a hub id), and a checkpoint's weights swapped into a live model in place (Serve's reconfigure, backend=local)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gapray.config import BUILTIN_MODELS, CONF_DIR, SHIPPED_MODELS, ModelConfig
from gapray.errors import UserError
from gapray.models.base import UnifiedModel
from gapray.models.builders import build_tiny_janus
from gapray.models.janus import JanusModel


def check_model(cfg: ModelConfig | DictConfig) -> None:
    """The cheap checks of load_model (no weights read): a job refuses a bad model.path before it starts."""
    if cfg.path in BUILTIN_MODELS:
        return
    if cfg.path in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[cfg.path]
        if not (shipped / "config.json").is_file():
            raise UserError(f"model.path: the '{cfg.path}' model is not in this install ({shipped}); train it with "
                            f"`python jobs/pretrain_world.py out_dir={shipped}`")
        return
    path = Path(cfg.path)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.path) is not None and not path.exists()
    if not path.exists() and not looks_like_hub_id:
        raise UserError(f"model.path: '{cfg.path}' is neither a directory nor a hub id (org/name); "
                        f"presets: {', '.join(sorted(p.stem for p in (CONF_DIR / 'model').glob('*.yaml')))}")
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"model.path: '{cfg.path}' has no config.json; point it at a save_pretrained directory")


def load_model(cfg: ModelConfig | DictConfig):
    """Build or load the configured model; a missing directory or unreachable hub id is a UserError."""
    check_model(cfg)
    compile = bool(getattr(cfg, "compile", False))
    if cfg.path in BUILTIN_MODELS:
        model, processor = build_tiny_janus()
        return JanusModel(model.to(cfg.device if cfg.device != "auto" else "cpu"), processor, compile=compile)
    if cfg.path in SHIPPED_MODELS:
        return JanusModel.from_pretrained(str(SHIPPED_MODELS[cfg.path]), dtype=cfg.dtype, device=cfg.device,
                                          compile=compile)
    looks_like_hub_id = not Path(cfg.path).exists()
    try:  # the local cache first: no network round-trips when the model is already here
        return JanusModel.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, local_files_only=True,
                                          compile=compile)
    except OSError as e:
        if not looks_like_hub_id:
            raise UserError(f"model.path: could not load '{cfg.path}': {str(e).splitlines()[0][:200]}") from None
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one error line, not one warning per retry
    try:
        return JanusModel.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, compile=compile)
    except OSError as e:
        raise UserError(f"model.path: could not load '{cfg.path}' from the hub or its local cache (is the hub "
                        f"reachable, the id right?): {str(e).splitlines()[0][:160]}") from None


def swap_weights(model: UnifiedModel, model_cfg: dict, checkpoint: str | None) -> None:
    """Copy a checkpoint's weights into the live model, tensor by tensor, in place.

    `checkpoint` is a save_pretrained directory; None means the weights `model_cfg` names (a reload back to
    the base policy). The module objects stay, and so does the device memory they hold: the new weights
    are loaded on the CPU, never a second copy on the device. Strict loading refuses another architecture.
    """
    fresh = load_model(OmegaConf.structured(ModelConfig(**{**model_cfg, "path": checkpoint or model_cfg["path"],
                                                           "device": "cpu"})))
    new, live = fresh.model.state_dict(), model.model.state_dict()
    # check everything before copying anything: a refused checkpoint leaves the served weights intact
    bad = sorted({k for k in live if k not in new or new[k].shape != live[k].shape} | (set(new) - set(live)))
    if bad:
        raise ValueError(f"checkpoint '{checkpoint}' does not fit the served model ({len(bad)} tensors differ, "
                         f"e.g. {bad[0]})")
    with torch.no_grad():
        model.model.load_state_dict(new, strict=True)
    del fresh, new
