"""Training objectives on image tokens given the prompt (PAPER.md, Algorithm 1 and its DPO variant).

Inputs are per-token log-probs of image tokens, (B, T), from `gapray.models.janus.image_token_logprobs`
(conditional, no CFG). Every image has the same T tokens (576 for Janus-Pro), so there is no mask.

SFT: the mean negative log-likelihood per image token.

DPO follows TRL's names and semantics (DPOConfig / DPOTrainer):
  margin   = (log pi(x+|y) - log ref(x+|y)) - (log pi(x-|y) - log ref(x-|y))     (summed over tokens)
  sigmoid  -log sigmoid(beta m) (1 - eps) - log sigmoid(-beta m) eps     (eps = label_smoothing: cDPO)
  hinge    relu(1 - beta m)
  ipo      (m / T - 1 / (2 beta))^2           (IPO always uses per-token means, as TRL does)
  robust   (-log sigmoid(beta m) (1 - eps) + log sigmoid(-beta m) eps) / (1 - 2 eps)
  rpo_alpha adds rpo_alpha * NLL of the chosen image (per-token mean), the NLL term the paper adds
  (TRL <= 0.2x `rpo_alpha`; TRL 1.x spells it loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]).
`average_logps=True` uses per-token mean log-probs in the margin for every loss type: 576 summed token
log-probs make beta*m huge, so sigmoid saturates after a step; with means, beta keeps its usual scale.
Metrics use TRL's names; rewards are beta * the summed log-ratios, as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gapray.config import DPO_LOSS_TYPES as LOSS_TYPES  # TRL's names; the config checks the same list


def sft_loss(token_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B, T) log-probs of the target image tokens -> mean NLL per token, and metrics."""
    loss = -token_logps.mean()
    return loss, {"loss": loss.detach(), "logps": token_logps.detach().sum(-1).mean()}


def dpo_loss(chosen_token_logps: torch.Tensor, rejected_token_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float | None = None,
             average_logps: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy per-token log-probs (B, T) of the chosen and rejected images, reference sums (B,) -> loss, metrics.

    The reference log-probs are sums over the T image tokens (what dpo.parquet stores); they carry no grad.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    n_tokens = chosen_token_logps.shape[-1]
    chosen_logps = chosen_token_logps.sum(-1)
    rejected_logps = rejected_token_logps.sum(-1)
    chosen_logratios = chosen_logps - ref_chosen_logps.to(chosen_logps.dtype)
    rejected_logratios = rejected_logps - ref_rejected_logps.to(rejected_logps.dtype)
    margin = chosen_logratios - rejected_logratios
    if average_logps or loss_type == "ipo":
        margin = margin / n_tokens

    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - eps) - F.logsigmoid(-beta * margin) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-F.logsigmoid(beta * margin) * (1 - eps) + F.logsigmoid(-beta * margin) * eps) / (1 - 2 * eps)
    loss = losses.mean()

    metrics = {}
    if rpo_alpha is not None:
        nll = -chosen_token_logps.mean()
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics.update({
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    })
    return loss, metrics
