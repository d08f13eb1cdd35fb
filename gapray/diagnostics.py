"""The learning-dynamics diagnostic (PAPER.md, "Learning dynamics"): does a generation training step move
held-out understanding, and which way?

For a model state theta, training samples (prompt y_u, image x_u) and held-out samples (y0, x0):
  g_gen = grad_theta log p(x_u | y_u)          the direction an SFT step on (y_u, x_u) follows
  g_und = grad_theta log U(x0, y0)             a held-out understanding log-likelihood
To first order an SGD step of size eta on the generation objective changes log U by eta * <g_und, g_gen>:
positive inner products mean that training generation alone raises understanding (co-improvement).
Two understanding log-likelihoods U, both teacher-forced:
  prompt:   log p(y0 | x0), the prompt's tokens after the image in a user turn: the theory's quantity;
            held-out samples the oracle calls aligned only (the prompt describes the image);
  verdict:  log p(v | x0, q(y0), "The score is"), v the oracle's verdict digit: the understanding the model
            judges its own images with (what the non-unification score and the win rate read).
Gradients are over the trainable parameters of training (the language model by default), one sample at a
time in eval mode (no dropout), so the figures are deterministic for a given checkpoint and sample set.
Reported per checkpoint: the mean of the per-pair inner products (= <mean g_und, mean g_gen>), the cosine of
the two mean gradients, the share of (train, held-out) pairs with a positive inner product, and the mean
held-out log-likelihood itself.
"""

from __future__ import annotations

import numpy as np
import torch

from gapray.models.janus import JanusModel, append_tokens, image_token_logprobs
from gapray.verdict import ANSWER_PREFIX, CAPTION_REQUEST, answer_tokens


def _flat_grad(params: list[torch.nn.Parameter], value: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def generation_loglik(jm: JanusModel, prompt: str, tokens: list[int]) -> torch.Tensor:
    """log p(image tokens | prompt), summed over tokens: the SFT objective's per-sample term."""
    enc = jm.generation_inputs([prompt])
    t = torch.tensor([tokens], device=jm.device)
    return image_token_logprobs(jm.model, enc["input_ids"], enc["attention_mask"], t).sum()


def prompt_loglik(jm: JanusModel, prompt: str, image: np.ndarray) -> torch.Tensor:
    """log p(prompt tokens | image), asked as a caption ("Describe this image.", the format the shapes-world
    model was pretrained on: gapray/world/pretrain.py caption_loss), the prompt's tokens teacher-forced."""
    chat = jm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_REQUEST}]}],
        add_generation_prompt=True)
    full = jm.understanding_inputs([f"{chat} {prompt}"], [image])
    n_prefix = jm.understanding_inputs([chat], [image]).input_ids.shape[1]  # where the prompt starts
    logits = jm.model(**full).logits[0].float()
    ids = full.input_ids[0]
    logp = logits[n_prefix - 1:-1].log_softmax(-1)  # position i predicts token i + 1
    return logp.gather(-1, ids[n_prefix:, None]).sum()


def verdict_loglik(jm: JanusModel, prompt: str, image: np.ndarray, verdict: int) -> torch.Tensor:
    """log p(the verdict answer | image, verdict question, "The score is"), over the whole vocabulary: the
    digit's log-prob, plus those of the tokens both answers start with where the tokenizer writes any."""
    text = f"{jm.verdict_text(prompt)} {ANSWER_PREFIX}"
    a = answer_tokens(jm.tokenizer, text)
    enc = append_tokens(jm.understanding_inputs([text], [image]), a.shared_suffix_ids)
    n = len(a.shared_suffix_ids)
    logp = jm.model(**enc, logits_to_keep=n + 1).logits[0].float().log_softmax(-1)  # position i predicts token i+1
    targets = [*a.shared_suffix_ids, a.one if verdict == 1 else a.zero]
    return logp[torch.arange(n + 1), targets].sum()


def gradient_alignment(jm: JanusModel, params: list[torch.nn.Parameter], train: list[dict],
                       heldout: list[dict]) -> dict:
    """train: rows with prompt, image_tokens; heldout: rows with prompt, image (uint8 HWC), oracle_verdict.
    -> {"prompt": {...}, "verdict": {...}} (see the module docstring); `params` must require grad."""
    was_training = jm.model.training
    jm.model.eval()
    try:
        g_gen = torch.stack([_flat_grad(params, generation_loglik(jm, r["prompt"], r["image_tokens"])) for r in train])
        out = {}
        for kind in ("prompt", "verdict"):
            rows = [r for r in heldout if kind == "verdict" or r["oracle_verdict"] == 1]
            values, grads = [], []
            for r in rows:
                value = (prompt_loglik(jm, r["prompt"], r["image"]) if kind == "prompt" else
                         verdict_loglik(jm, r["prompt"], r["image"], r["oracle_verdict"]))
                values.append(float(value.detach()))
                grads.append(_flat_grad(params, value))
            g_und = torch.stack(grads)
            pairs = g_gen @ g_und.T  # (train, held-out) inner products
            mean_gen, mean_und = g_gen.mean(0), g_und.mean(0)
            out[kind] = {"inner": float(pairs.mean()),
                         "cosine": float(mean_gen @ mean_und / (mean_gen.norm() * mean_und.norm() + 1e-30)),
                         "positive_share": float((pairs > 0).double().mean()),
                         "loglik": float(np.mean(values)), "n_train": len(train), "n_heldout": len(rows)}
        return out
    finally:
        jm.model.train(was_training)
