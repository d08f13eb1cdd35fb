"""Our CFG sampler against transformers' own image-generation loop, and against teacher forcing.

The parity tests run the eager decode step and, for a few cases, the torch.compile'd one (issue 16). The
compiled cases share one graph (CFG 4, temperature 1, 6 rows -> batch bucket 8, prompts -> length 32):
inductor compiles it once per process (~1-2 min on a loaded 2-core CPU, seconds from its on-disk cache).
"""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (ClassifierFreeGuidanceLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from gapray.models import SamplingParams
from gapray.models.sampler import (BATCH_BUCKETS, LENGTH_BUCKET, bucket_rows, cfg_decode, derive_seed,
                                   guided_logprobs, row_uniforms, sample_from_logprobs)

from conftest import PROMPTS


class RecordScores(LogitsProcessor):
    """Sees the (2B, V) cond/uncond scores in transformers' loop, before its CFG processor."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().clone())
        return scores


# the one compiled graph the compiled cases share: these settings, 6 rows (bucket 8)
COMPILED_PARAMS = SamplingParams(guidance_scale=4.0)
EAGER, COMPILED = pytest.param(False, id="eager"), pytest.param(True, id="compiled")


@pytest.fixture
def model_compile(tiny, request, monkeypatch):
    """tiny, sampling through the compiled or the eager step (the test's `compile` parameter)."""
    monkeypatch.setattr(tiny, "compile", request.getfixturevalue("compile"))
    return tiny


def hf_generate(tiny, prompts, n, **kw):
    enc = tiny.generation_inputs(prompts)
    rec = RecordScores()
    torch.manual_seed(0)
    tokens = tiny.model.generate(**enc, generation_mode="image", num_return_sequences=n,
                                 logits_processor=LogitsProcessorList([rec]), **kw)
    return enc, tokens, rec.steps


@pytest.mark.parametrize("temperature,top_k,top_p,compile", [(1.0, None, None, False), (0.7, None, None, False),
                                                             (0.8, 20, None, False), (1.0, None, 0.9, False),
                                                             (1.0, None, None, True)])
def test_guided_distribution_matches_transformers_every_step(tiny, temperature, top_k, top_p, compile):
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
    if compile:
        assert params == COMPILED_PARAMS
    cfg_decode(tiny.model, ids, mask, tiny.n_image_tokens, params, keep_ids=[tiny.bos_id, tiny.boi_id],
               pad_id=tiny.pad_id, forced_tokens=hf_tokens, on_step=lambda t, lp: ours.append(lp.exp()),
               compile=compile)
    assert len(ours) == len(hf_probs) == tiny.n_image_tokens
    worst = max((a - b).abs().max().item() for a, b in zip(ours, hf_probs))
    assert worst < 1e-4, worst


def test_greedy_matches_transformers_tokens(tiny):
    """Greedy decoding is deterministic, so our tokens must equal transformers' token for token."""
    _, hf_tokens, _ = hf_generate(tiny, PROMPTS, 1, do_sample=False, guidance_scale=3.0)
    ours = tiny.sample(PROMPTS, 1, SamplingParams(guidance_scale=3.0, temperature=0.0), seeds=0)
    assert torch.equal(ours.tokens, hf_tokens)


@pytest.mark.parametrize("params,compile", [
    (SamplingParams(guidance_scale=5.0), False),
    (SamplingParams(guidance_scale=1.0), False),
    (SamplingParams(guidance_scale=3.0, temperature=0.8, top_k=20), False),
    (SamplingParams(guidance_scale=2.0, top_p=0.9), False),
    (COMPILED_PARAMS, True),
])
def test_recorded_logprobs_equal_teacher_forcing(model_compile, params, compile):
    """(b) The log-probs the loop records for its own samples equal a teacher-forced forward pass over the
    sampled tokens (one parallel forward, cond and uncond rows) under the same sampling distribution."""
    tiny, n = model_compile, 2
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


@pytest.mark.parametrize("compile", [EAGER, COMPILED])
def test_same_seeds_same_images_whatever_the_batch(model_compile, compile):
    tiny, params = model_compile, COMPILED_PARAMS
    a = tiny.sample(PROMPTS, 2, params, seeds=11)
    b = tiny.sample(PROMPTS, 2, params, seeds=11)
    assert torch.equal(a.tokens, b.tokens)
    # a row's image depends on its own seed, not on its neighbours or its padding
    alone = tiny.sample(PROMPTS[2:], 1, params, seeds=[a.seeds[4]])
    assert torch.equal(alone.tokens[0], a.tokens[4])
    c = tiny.sample(PROMPTS, 2, params, seeds=12)
    assert not torch.equal(a.tokens, c.tokens)


def test_compiled_step_draws_what_the_eager_step_draws(tiny, monkeypatch):
    """The compiled step samples the eager step's tokens with its log-probs (float rounding apart), and
    calls of other batch sizes / prompt lengths in the same buckets reuse its graph: no recompilation."""
    from torch._dynamo.utils import counters

    eager = tiny.sample(PROMPTS, 2, COMPILED_PARAMS, seeds=5)
    monkeypatch.setattr(tiny, "compile", True)
    compiled = tiny.sample(PROMPTS, 2, COMPILED_PARAMS, seeds=5)
    assert torch.equal(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    again = tiny.sample(PROMPTS[1:], 3, COMPILED_PARAMS, seeds=5)  # 6 rows, other padding: the same shapes
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again.tokens, tiny.sample(PROMPTS[1:], 3, COMPILED_PARAMS, seeds=5).tokens)


def test_buckets():
    assert [bucket_rows(n) for n in (1, 8, 9, 64, 65)] == [8, 8, 16, 64, 128]
    assert bucket_rows(BATCH_BUCKETS[-1] + 1) == 2 * BATCH_BUCKETS[-1]
    assert LENGTH_BUCKET >= 8


def test_static_decode_handles_left_padding(tiny):
    """A prompt left-padded further (more masked pad slots, as the compiled path's length buckets do) gives
    the same distributions: padding is masked and position ids count from the first real token."""
    enc = tiny.generation_inputs(PROMPTS[:1])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad = 5
    ids2 = torch.cat([torch.full((1, pad), tiny.pad_id), ids], 1)
    mask2 = torch.cat([torch.zeros(1, pad, dtype=mask.dtype), mask], 1)
    u = row_uniforms([3], tiny.n_image_tokens)
    kw = dict(keep_ids=[tiny.bos_id, tiny.boi_id], pad_id=tiny.pad_id, uniforms=u)
    a = cfg_decode(tiny.model, ids, mask, tiny.n_image_tokens, COMPILED_PARAMS, **kw)
    b = cfg_decode(tiny.model, ids2, mask2, tiny.n_image_tokens, COMPILED_PARAMS, **kw)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


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


def test_static_decode_under_eager_attention_matches_sdpa(tiny):
    """The step's mask in the other layout (eager attention takes an additive float mask, sdpa a bool one)."""
    from gapray.models import JanusModel
    from gapray.models.builders import build_tiny_janus

    other = JanusModel(*build_tiny_janus(PROMPTS, seed=0))
    other.model.set_attn_implementation("eager")
    assert other.model.model.language_model.config._attn_implementation == "eager"
    a = tiny.sample(PROMPTS, 1, COMPILED_PARAMS, seeds=2)
    b = other.sample(PROMPTS, 1, COMPILED_PARAMS, seeds=2)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
