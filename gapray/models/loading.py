"""Loading a policy: weights swapped into a live model in place (Serve's reconfigure, backend=local's serve)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from gapray.config import ModelConfig, load_model
from gapray.models.base import UnifiedModel


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
