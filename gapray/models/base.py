"""The UnifiedModel interface: what gapray needs from a model that both draws and judges images.

Images travel as discrete token ids (what generation emits and training consumes); pixels appear
only when a model judges an image or a report shows it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from gapray.models.sampler import SamplingParams


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (P * n, T) long; rows ordered [p0 s0, p0 s1, ..., p1 s0, ...]
    logprobs: torch.Tensor  # (P * n, T) float32; log-prob of each token under its sampling distribution
    seeds: list[int]  # the per-row seeds that drew them


@dataclass
class ScoreOutput:
    p_aligned: np.ndarray  # (B,) float64 in [0, 1]; NaN where a generate-mode answer did not parse
    answers: list[str | None]  # free-text answers in generate mode, None in logits mode


class UnifiedModel(ABC):
    image_size: int  # pixels per side of the images it draws and judges
    n_image_tokens: int  # tokens per generated image

    @abstractmethod
    def sample(self, prompts: list[str], n_per_prompt: int = 1, sampling: SamplingParams = SamplingParams(),
               seeds: int | list[int] = 0) -> SampleOutput: ...

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """(B, T) image tokens -> (B, H, W, 3) uint8 RGB."""

    @abstractmethod
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB -> (B, T) image tokens: the inverse of decode, up to quantisation."""

    def reencode(self, tokens: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """The tokens of the picture that `tokens` decode to: what a trainer that reads images would see.
        `batch` images at a time: decode holds one batch of pixels in memory."""
        return torch.cat([self.encode_images(self.decode(tokens[i:i + batch])) for i in range(0, len(tokens), batch)])

    @abstractmethod
    def score(self, prompts: list[str], images: np.ndarray, mode: str = "logits") -> ScoreOutput:
        """Self-judgement of (prompt, image) pairs with the verdict question."""

    @abstractmethod
    def image_logprobs(self, prompts: list[str], tokens: torch.Tensor,
                       sampling: SamplingParams | None = None) -> torch.Tensor:
        """(B, T) teacher-forced log-probs of image tokens: conditional if sampling is None, else under
        the exact distribution `sample` draws from. Differentiable when grad is enabled."""


@torch.inference_mode()
def conditional_logprobs(model: UnifiedModel, prompts: list[str], tokens) -> list[float]:
    """Sum over image tokens of log p(token | prompt, earlier tokens): the DPO reference log-prob."""
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    return model.image_logprobs(prompts, t, sampling=None).sum(-1).tolist()


def local_reference(model: UnifiedModel, batch_size: int = 8):
    """(prompts, image tokens) -> conditional_logprobs, from a model in this process, `batch_size` images per
    forward pass: the DPO reference (gapray.data.preference.Reference) of backend=local."""
    def reference(prompts: list[str], tokens: list[list[int]]) -> list[float]:
        out = []
        for i in range(0, len(prompts), batch_size):
            out += conditional_logprobs(model, prompts[i:i + batch_size], tokens[i:i + batch_size])
        return out
    return reference
