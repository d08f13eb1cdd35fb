"""Our own batched classifier-free-guidance (CFG) decode loop for Janus-style image tokens.

Why not transformers' `generate(generation_mode="image")`:
  - it draws with one global RNG, so a row's image depends on what else is in the batch; here every row
    has its own seed (inverse-CDF sampling from per-row uniforms), so an image is a function of
    (model, prompt, seed) alone, whatever the batching or the number of workers;
  - it records no per-token log-probs (its `scores` holds the last step only); we return the log-prob
    of every sampled token under the distribution it was drawn from;
  - it runs the language model once more after the last token, which the last token does not need.

Layout: the batch is [cond rows; uncond rows] (transformers' block layout). In the uncond rows every
prompt token except BOS and <begin_of_image> is replaced by the pad id, exactly as transformers does.
Guidance is applied on raw logits: uncond + s * (cond - uncond), then temperature, then top-k/top-p.

`guided_logprobs` is the single definition of the sampling distribution: the loop samples from it and
`JanusModel.image_logprobs(..., sampling=...)` evaluates it teacher-forced, so the two cannot drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StaticCache


@dataclass(frozen=True)
class SamplingParams:
    guidance_scale: float = 5.0  # 1.0 means no guidance (no uncond rows at all)
    temperature: float = 1.0  # 0 means greedy (argmax of the guided distribution)
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


def guided_logprobs(cond: torch.Tensor, uncond: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """Log-probs of the distribution the sampler draws from, given raw cond/uncond logits (..., V)."""
    logits = cond.float() if uncond is None else uncond.float() + p.guidance_scale * (cond.float() - uncond.float())
    if p.temperature > 0:
        logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1)


def derive_seed(seed: int, *keys) -> int:
    """A stable 63-bit seed from a base seed and any keys (prompt id, sample index, ...)."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *keys))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def row_uniforms(seeds: list[int], n_tokens: int) -> torch.Tensor:
    """(rows, n_tokens) float64 uniforms in [0, 1), one independent stream per row."""
    out = torch.empty(len(seeds), n_tokens, dtype=torch.float64)
    for i, s in enumerate(seeds):
        out[i] = torch.rand(n_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
    return out


def sample_from_logprobs(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row i takes the first token whose cumulative probability exceeds u[i]."""
    cdf = logp.double().exp().cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=logp.shape[-1] - 1)


def uncond_input_ids(input_ids: torch.Tensor, keep_ids: list[int], pad_id: int) -> torch.Tensor:
    keep = torch.isin(input_ids, torch.tensor(keep_ids, device=input_ids.device))
    return input_ids.masked_fill(~keep, pad_id)


# no_grad, not inference_mode: sampled tokens feed training later, and inference tensors cannot.
@torch.no_grad()
def cfg_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_tokens: int,
    params: SamplingParams,
    *,
    keep_ids: list[int],
    pad_id: int,
    uniforms: torch.Tensor | None = None,
    forced_tokens: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `n_tokens` image tokens for each (left-padded) prompt row ending in <begin_of_image>.

    Either draws with `uniforms` (rows, n_tokens), or follows `forced_tokens` (rows, n_tokens) and only
    reports their log-probs (used by the parity tests). `on_step(t, logp)` sees the full (rows, V)
    sampling log-probs at step t. Returns (tokens, logprobs), both (rows, n_tokens).
    """
    if (uniforms is None) == (forced_tokens is None):
        raise ValueError("pass exactly one of uniforms / forced_tokens")
    B, L = input_ids.shape
    device = input_ids.device
    lm = model.model.language_model
    head = model.model.generation_head

    if params.guided:
        ids = torch.cat([input_ids, uncond_input_ids(input_ids, keep_ids, pad_id)])
        mask = torch.cat([attention_mask, attention_mask])
    else:
        ids, mask = input_ids, attention_mask
    # A static cache sized for prompt + image: no per-step re-allocation of K/V (DynamicCache concatenates).
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=L + n_tokens)
    h = lm(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
           past_key_values=cache, use_cache=True).last_hidden_state[:, -1]

    tokens = torch.empty(B, n_tokens, dtype=torch.long, device=device)
    logps = torch.empty(B, n_tokens, dtype=torch.float32, device=device)
    ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=device)
    for t in range(n_tokens):
        logits = head(h)
        lp = guided_logprobs(logits[:B], logits[B:] if params.guided else None, params)
        if on_step is not None:
            on_step(t, lp)
        if forced_tokens is not None:
            tok = forced_tokens[:, t].to(device)
        elif params.temperature == 0:
            tok = lp.argmax(-1)
        else:
            tok = sample_from_logprobs(lp, uniforms[:, t])
        tokens[:, t] = tok
        logps[:, t] = lp.gather(-1, tok[:, None]).squeeze(-1)
        if t == n_tokens - 1:
            break  # the last token needs no forward pass
        step_tok = torch.cat([tok, tok]) if params.guided else tok
        mask = torch.cat([mask, ones], dim=1)
        h = lm(inputs_embeds=model.prepare_embeddings_for_image_generation(step_tok[:, None]),
               attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    return tokens, logps
