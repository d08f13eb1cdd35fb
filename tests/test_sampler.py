"""Our CFG sampler against transformers' own image-generation loop, and against teacher forcing."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (ClassifierFreeGuidanceLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from gapray.models import SamplingParams
from gapray.models.sampler import cfg_decode, derive_seed, guided_logprobs, row_uniforms, sample_from_logprobs

from conftest import PROMPTS


class RecordScores(LogitsProcessor):
    """Sees the (2B, V) cond/uncond scores in transformers' loop, before its CFG processor."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().clone())
        return scores


def hf_generate(tiny, prompts, n, **kw):
    enc = tiny.generation_inputs(prompts)
    rec = RecordScores()
    torch.manual_seed(0)
    tokens = tiny.model.generate(**enc, generation_mode="image", num_return_sequences=n,
                                 logits_processor=LogitsProcessorList([rec]), **kw)
    return enc, tokens, rec.steps


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (0.8, 20, None),
                                                     (1.0, None, 0.9)])
def test_guided_distribution_matches_transformers_every_step(tiny, temperature, top_k, top_p):
    """(a) For transformers' own token prefix, the distribution our loop samples from at every step equals
    the one transformers' loop computes, fp32, 1e-4. transformers runs user processors, then its CFG
    processor, then the sampling warpers (temperature, top-k, top-p); we record the raw (2B, V) scores in
    its loop and apply its own processor classes in that order."""
    s, n = 4.0, 2
    enc, hf_tokens, hf_scores = hf_generate(tiny, PROMPTS, n, do_sample=True, guidance_scale=s,
                                            temperature=temperature, top_k=top_k, top_p=top_p)
    assert hf_tokens.shape == (len(PROMPTS) * n, tiny.n_image_tokens)
    chain = LogitsProcessorList([ClassifierFreeGuidanceLogitsProcessor(s), TemperatureLogitsWarper(temperature)]
                                + ([TopKLogitsWarper(top_k)] if top_k else [])
                                + ([TopPLogitsWarper(top_p)] if top_p else []))
    dummy = torch.zeros(len(PROMPTS) * n, 1, dtype=torch.long)
    hf_probs = [chain(dummy, sc).softmax(-1) for sc in hf_scores]

    ours = []
    ids = enc["input_ids"].repeat_interleave(n, 0)
    mask = enc["attention_mask"].repeat_interleave(n, 0)
    params = SamplingParams(guidance_scale=s, temperature=temperature, top_k=top_k, top_p=top_p)
    cfg_decode(tiny.model, ids, mask, tiny.n_image_tokens, params, keep_ids=[tiny.bos_id, tiny.boi_id],
               pad_id=tiny.pad_id, forced_tokens=hf_tokens, on_step=lambda t, lp: ours.append(lp.exp()))
    assert len(ours) == len(hf_probs) == tiny.n_image_tokens
    worst = max((a - b).abs().max().item() for a, b in zip(ours, hf_probs))
    assert worst < 1e-4, worst


def test_greedy_matches_transformers_tokens(tiny):
    """Greedy decoding is deterministic, so our tokens must equal transformers' token for token."""
    _, hf_tokens, _ = hf_generate(tiny, PROMPTS, 1, do_sample=False, guidance_scale=3.0)
    ours = tiny.sample(PROMPTS, 1, SamplingParams(guidance_scale=3.0, temperature=0.0), seeds=0)
    assert torch.equal(ours.tokens, hf_tokens)


@pytest.mark.parametrize("params", [
    SamplingParams(guidance_scale=5.0),
    SamplingParams(guidance_scale=1.0),
    SamplingParams(guidance_scale=3.0, temperature=0.8, top_k=20),
    SamplingParams(guidance_scale=2.0, top_p=0.9),
])
def test_recorded_logprobs_equal_teacher_forcing(tiny, params):
    """(b) The log-probs the loop records for its own samples equal a teacher-forced forward pass over the
    sampled tokens (one parallel forward, cond and uncond rows) under the same sampling distribution."""
    n = 3
    out = tiny.sample(PROMPTS, n, params, seeds=7)
    prompts = [p for p in PROMPTS for _ in range(n)]
    forced = tiny.image_logprobs(prompts, out.tokens, sampling=params)
    assert forced.shape == out.logprobs.shape == (len(prompts), tiny.n_image_tokens)
    assert torch.isfinite(out.logprobs).all()
    torch.testing.assert_close(forced.detach(), out.logprobs, atol=1e-4, rtol=0)


def test_conditional_logprobs_are_the_unguided_distribution(tiny):
    """image_logprobs(sampling=None) is the plain conditional model (the training objective); with CFG it
    differs, so the two must not coincide."""
    out = tiny.sample(PROMPTS[:1], 2, SamplingParams(guidance_scale=5.0), seeds=3)
    cond = tiny.image_logprobs(PROMPTS[:1] * 2, out.tokens)
    unguided = tiny.image_logprobs(PROMPTS[:1] * 2, out.tokens, sampling=SamplingParams(guidance_scale=1.0))
    torch.testing.assert_close(cond, unguided, atol=1e-5, rtol=0)
    assert (cond - out.logprobs).abs().max() > 1e-2


def test_same_seeds_same_images_whatever_the_batch(tiny):
    params = SamplingParams(guidance_scale=5.0)
    a = tiny.sample(PROMPTS, 2, params, seeds=11)
    b = tiny.sample(PROMPTS, 2, params, seeds=11)
    assert torch.equal(a.tokens, b.tokens)
    # a row's image depends on its own seed, not on its neighbours or its padding
    alone = tiny.sample(PROMPTS[2:], 1, params, seeds=[a.seeds[4]])
    assert torch.equal(alone.tokens[0], a.tokens[4])
    c = tiny.sample(PROMPTS, 2, params, seeds=12)
    assert not torch.equal(a.tokens, c.tokens)


def test_grad_flows_through_teacher_forced_logprobs(tiny):
    out = tiny.sample(PROMPTS[:1], 1, SamplingParams(), seeds=0)
    lp = tiny.image_logprobs(PROMPTS[:1], out.tokens).sum()
    lp.backward()
    lm_grad = tiny.model.model.language_model.layers[0].mlp.up_proj.weight.grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.model.vqmodel.parameters())
    tiny.model.zero_grad(set_to_none=True)


def test_inverse_cdf_sampler_follows_the_distribution():
    """Empirical frequencies of the per-row inverse-CDF draw match the probabilities (and masked tokens,
    probability 0, are never drawn)."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logp = probs.log().expand(20000, 4)
    u = row_uniforms([derive_seed(0, i) for i in range(20000)], 1)[:, 0]
    draws = sample_from_logprobs(logp, u)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_top_k_top_p_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    lp = guided_logprobs(logits, None, SamplingParams(guidance_scale=1.0, top_k=2))
    assert torch.isinf(lp[0, 2:]).all() and torch.isfinite(lp[0, :2]).all()
    p = logits.softmax(-1)[0]  # ~[.64, .24, .09, .03]
    lp = guided_logprobs(logits, None, SamplingParams(guidance_scale=1.0, top_p=0.8))
    kept = torch.isfinite(lp[0])
    assert kept.tolist() == [True, True, False, False]  # .64 < .8, so the second token is needed
    torch.testing.assert_close(lp[0, :2].exp(), p[:2] / p[:2].sum())
