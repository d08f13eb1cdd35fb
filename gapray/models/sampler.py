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

The decode step (`decode_step`: embed the last token -> one LM step on a static KV cache -> generation head
-> guided log-probs -> draw) has static shapes and no host sync, so `cfg_decode(..., compile=True)` (config
`model.compile`) runs it through torch.compile: inductor on a CPU, CUDA graphs ("reduce-overhead") on a GPU,
at bucketed batch sizes and prompt lengths. The eager and the compiled loop run the same function.
"""

from __future__ import annotations

import hashlib
import weakref
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


def image_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """The seed of one image: a function of (run seed, prompt id, sample index) alone, so an image never depends
    on batching, replicas or workers."""
    return derive_seed(seed, prompt_id, sample_idx)


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


# ---- the decode loop ---------------------------------------------------------------------------------
# Static shapes, so that one decode step can be captured (torch.compile; CUDA graphs on a GPU):
#   - the KV cache (transformers' StaticCache) and the key mask are allocated once for prompt + image;
#   - step t feeds image token t-1 at cache slot Lb+t-1 (Lb: the bucketed prompt length); its key mask is
#     the static padding mask AND (key slot <= that slot), computed in the step, nothing grows or is cat'ed;
#   - position ids are explicit: a row's positions count from its first real token (slot - its padding),
#     as in the original Janus (unpadded prompts start at 0) -- so a row's maths does not depend on how far
#     it is left-padded. transformers' Janus loop passes none (the LM then uses the cache slot, pads counted);
#     RoPE is relative, so the two agree to float rounding (the parity tests pin 1e-4);
#   - the mask reaches the attention as the 4D tensor its implementation takes (sdpa: bool, eager: additive),
#     so transformers' mask builder (which syncs to the host) is skipped; no .item(), no branching on values.
# With `compile`, batch rows are padded up to a bucket (powers of two) and prompts left-padded to a multiple
# of LENGTH_BUCKET, so a few graphs serve every call; the padding rows are dropped from the results.

LENGTH_BUCKET = 32
# The smallest is 8: a decode step reads all the weights whatever the batch, so 8 rows cost about what 1 does.
BATCH_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)
RECOMPILE_LIMIT = 64  # graphs per process: batch buckets x length buckets x sampling settings
_COMPILED: dict[str, Callable] = {}
_CACHE_POOL_SIZE = 4  # compiled path: static caches kept per (rows, length) so CUDA graphs see fixed addresses
_CACHE_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(rows, length): StaticCache}


def compile_mode(device: torch.device) -> str:
    """torch.compile mode for the decode step: CUDA graphs on a GPU, inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def bucket_rows(n: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= n), -(-n // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1])


def _compiled_step(mode: str) -> Callable:
    if mode not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[mode] = torch.compile(decode_step, mode=mode, dynamic=False, fullgraph=True)
    return _COMPILED[mode]


def _static_cache(model, rows: int, max_len: int, pooled: bool) -> StaticCache:
    config = model.config.get_text_config(decoder=True)
    if not pooled:
        return StaticCache(config=config, max_cache_len=max_len)
    pool = _CACHE_POOLS.setdefault(model, {})
    key = (rows, max_len)
    cache = pool.pop(key, None)
    if cache is None:
        cache = StaticCache(config=config, max_cache_len=max_len)
        while len(pool) >= _CACHE_POOL_SIZE:
            pool.pop(next(iter(pool)))
    else:
        cache.reset()
    pool[key] = cache  # most recently used last
    return cache


def _step_mask(key_ok: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(rows, K) bool, True = attend -> what the attention implementation takes for one query token."""
    if kind == "sdpa":
        return key_ok[:, None, None, :]
    if kind == "eager":
        zero = torch.zeros((), dtype=dtype, device=key_ok.device)
        return torch.where(key_ok, zero, torch.finfo(dtype).min)[:, None, None, :]
    return key_ok  # other implementations: a 2D mask over the whole static cache, through transformers' builder


def head_draw(model, h: torch.Tensor, t: torch.Tensor, params: SamplingParams, u: torch.Tensor | None):
    """Generation head -> guided log-probs -> the draw for step t: (token (B,), its log-prob (B,), all (B, V)).

    Temperature 0 takes the argmax; otherwise the inverse-CDF draw with the uniforms u[t] (u: (n_tokens, B)).
    """
    logits = model.model.generation_head(h)
    B = logits.shape[0] // 2 if params.guided else logits.shape[0]
    lp = guided_logprobs(logits[:B], logits[B:] if params.guided else None, params)
    tok = lp.argmax(-1) if params.temperature == 0 else sample_from_logprobs(lp, u.index_select(0, t).squeeze(0))
    return tok, lp.gather(-1, tok[:, None]).squeeze(-1), lp


def decode_step(model, cache: StaticCache, tok: torch.Tensor, t: torch.Tensor, key_pad: torch.Tensor,
                n_pad: torch.Tensor, prompt_len: int, params: SamplingParams, u: torch.Tensor | None, mask_kind: str):
    """One static-shape decode step: embed image token t-1 -> LM step on the static cache -> head_draw for t.

    tok (B,) is token t-1, t a 0-d long tensor, key_pad (rows, K) the static padding mask over the whole
    cache (prompt mask, then True for the image slots), n_pad (rows,) each row's left padding, prompt_len
    the (padded) prompt length; u (n_tokens, B) the uniforms. Shapes never change from step to step, so
    the function compiles to one graph per shape.
    """
    K = key_pad.shape[1]
    slot = t + (prompt_len - 1)  # the cache slot token t-1 is written to
    step_tok = torch.cat([tok, tok]) if params.guided else tok
    embeds = model.prepare_embeddings_for_image_generation(step_tok[:, None])
    key_ok = key_pad & (torch.arange(K, device=key_pad.device) <= slot)
    position_ids = (slot - n_pad)[:, None]
    h = model.model.language_model(inputs_embeds=embeds, attention_mask=_step_mask(key_ok, mask_kind, embeds.dtype),
                                   position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state[:, -1]
    return head_draw(model, h, t, params, u)


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, to_len: int, pad_id: int):
    extra = to_len - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
            torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], 1))


def _pad_rows(x: torch.Tensor | None, rows: int, dim: int = 0) -> torch.Tensor | None:
    """Fill up to `rows` along `dim` with copies of the last row (their results are dropped)."""
    if x is None or x.shape[dim] >= rows:
        return x
    last = x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat([x, last.expand(*[rows - x.shape[dim] if d == dim else -1 for d in range(x.dim())])], dim)


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
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `n_tokens` image tokens for each (left-padded) prompt row ending in <begin_of_image>.

    Either draws with `uniforms` (rows, n_tokens) (temperature 0: argmax, uniforms unused), or follows
    `forced_tokens` (rows, n_tokens) and only reports their log-probs (used by the parity tests).
    `on_step(t, logp)` sees the full (rows, V) sampling log-probs at step t (a buffer the next step may
    overwrite on CUDA graphs: copy what you keep). `compile=True` runs the decode step through
    torch.compile (`compile_mode(device)`), at bucketed batch sizes and prompt lengths; the prefill stays
    eager. Returns (tokens, logprobs), both (rows, n_tokens).
    """
    if (uniforms is None) == (forced_tokens is None):
        raise ValueError("pass exactly one of uniforms / forced_tokens")
    B, L = input_ids.shape
    device = input_ids.device
    lm = model.model.language_model
    # Forced tokens (the parity tests) run the very same step: its draw is discarded for the forced token.
    if params.temperature == 0:
        u = None
    elif uniforms is not None:
        u = uniforms.to(device=device, dtype=torch.float64).t().contiguous()  # (n_tokens, B)
    else:
        u = torch.zeros(n_tokens, B, dtype=torch.float64, device=device)
    forced = forced_tokens.to(device).t().contiguous() if forced_tokens is not None else None

    Bb = B
    if compile:  # a few static shapes for every call
        Bb = bucket_rows(B)
        input_ids, attention_mask = _left_pad(input_ids, attention_mask, -(-L // LENGTH_BUCKET) * LENGTH_BUCKET, pad_id)
        input_ids, attention_mask, u = _pad_rows(input_ids, Bb), _pad_rows(attention_mask, Bb), _pad_rows(u, Bb, 1)
        if forced is not None:
            forced = _pad_rows(forced, Bb, 1)
    Lb = input_ids.shape[1]
    if params.guided:
        ids = torch.cat([input_ids, uncond_input_ids(input_ids, keep_ids, pad_id)])
        mask = torch.cat([attention_mask, attention_mask])
    else:
        ids, mask = input_ids, attention_mask
    rows, K = ids.shape[0], Lb + n_tokens
    n_pad = Lb - mask.sum(-1)
    cache = _static_cache(model, rows, K, pooled=compile)
    h = lm(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
           position_ids=(mask.cumsum(-1) - 1).clamp_(min=0), cache=cache, use_cache=True).last_hidden_state[:, -1]

    key_pad = torch.ones(rows, K, dtype=torch.bool, device=device)
    key_pad[:, :Lb] = mask.bool()
    impl = getattr(lm.config, "_attn_implementation", None)
    mask_kind = impl if impl in ("sdpa", "eager") else "2d"
    step = _compiled_step(compile_mode(device)) if compile else decode_step
    # CUDA graphs (reduce-overhead): each step may overwrite the previous step's outputs, which are copied
    # (or cloned) before the next one; saying so keeps one graph replaying instead of recording new ones.
    mark_step = torch.compiler.cudagraph_mark_step_begin if compile and device.type == "cuda" else None

    tokens = torch.empty(n_tokens, Bb, dtype=torch.long, device=device)
    logps = torch.empty(n_tokens, Bb, dtype=torch.float32, device=device)
    t_dev = torch.zeros((), dtype=torch.long, device=device)  # the step index, on the device: no host sync
    tok, logp, lp = head_draw(model, h, t_dev, params, u)
    for t in range(n_tokens):
        if t > 0:
            t_dev = t_dev + 1
            if mark_step is not None:
                mark_step()
            tok, logp, lp = step(model, cache, tok, t_dev, key_pad, n_pad, Lb, params, u, mask_kind)
        if forced is not None:
            tok = forced[t].clone()  # contiguous, offset 0: the same input layout as a drawn token
            logp = lp.gather(-1, tok[:, None]).squeeze(-1)
        elif compile:
            tok = tok.clone()  # a CUDA graph's outputs are overwritten by its next replay
        if on_step is not None:
            on_step(t, lp[:B])
        tokens[t] = tok
        logps[t] = logp
    return tokens.t()[:B].contiguous(), logps.t()[:B].contiguous()
