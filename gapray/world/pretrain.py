"""Pretrain the shapes-world Janus from scratch on a CPU: the VQ image tokenizer, then the language model.

Stage 1, VQ tokenizer: transformers' JanusVQVAE trained as an autoencoder on renders of train-split
prompts. Its `forward` decodes from looked-up codes (no gradient reaches the encoder), so the training
step is written here, LlamaGen-style: l2-normalised latents and codes (the normalised lookup is what
`decode` uses), a straight-through estimator, codebook + commitment losses, dead codes restarted from
the batch. Object pixels weigh more than background: shapes are a small share of each image.

Stage 2, language model (+ vision encoder, aligners, generation head), three objectives per step:
  - generation: NLL of the image tokens of a render given the prompt; the prompt is dropped (uncond row
    of CFG: everything but BOS and <begin_of_image> set to pad) 10% of the time, so guidance works;
  - understanding: the paper's verdict question (verbatim) about an image, answered "The score is 1/0 .",
    the label given by the oracle on that exact image. Images are VQ round trips of positives and of
    renders of perturbed prompts (hard negatives), round trips with corrupted tokens, and, after the
    first part of training, the model's own generations: understanding learns to judge what generation
    actually produces;
  - captioning: describe an image the oracle accepted with its prompt (log p(prompt | image)), the dense
    signal the vision tower needs to learn what is in an image before it can judge it.
Only train-split prompts are ever rendered or generated here; the eval split stays held out (its words
are in the tokenizer's vocabulary, nothing else of it is used).
Assumes the whole (small) training set fits in memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gapray.models import JanusModel, SamplingParams
from gapray.models.builders import build_janus
from gapray.models.janus import resolve_device, vq_nearest_codes
from gapray.verdict import ANSWER_PREFIX, CAPTION_REQUEST
from gapray.world.grammar import SPLITS, load_world_prompts
from gapray.world.oracle import judge
from gapray.world.render import render

IMAGE_SIZE = 32
# 32 px images in 4 px patches: an 8 x 8 grid, 64 image tokens per image. (64 px quadruples the VQ's
# convolution cost for no gain the oracle can see: it judges 32 px renders exactly, blurred and noised too.)
WORLD_ARCH = dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=128, num_layers=4, num_heads=4,
                  intermediate_size=344, codebook_size=256, vq_base_channels=32, vq_channel_multiplier=[1, 2, 2],
                  vision_hidden=128, vision_layers=3)


def world_words() -> list[str]:
    """The tokenizer's vocabulary: every word any world prompt (any split) can use."""
    return [r["prompt"] for split in SPLITS for r in load_world_prompts(split)]


def build_world_model(seed: int = 0, device: str = "cpu", **arch) -> JanusModel:
    """A fresh world model: WORLD_ARCH, with any of its keys replaced by `arch` (e.g. a wider language model)."""
    unknown = set(arch) - set(WORLD_ARCH)
    if unknown:
        raise ValueError(f"unknown world-model architecture keys {sorted(unknown)}; valid: {sorted(WORLD_ARCH)}")
    model, processor = build_janus(world_words(), seed=seed, **{**WORLD_ARCH, **arch})
    return JanusModel(model.to(resolve_device(device)), processor)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_batch(rows: list[dict], rng: np.random.Generator) -> np.ndarray:
    return np.stack([render(r, IMAGE_SIZE, rng) for r in rows])


def task_balanced(rows: list[dict], n: int, rng: np.random.Generator, alpha: float = 0.0) -> list[dict]:
    """n rows drawn with replacement: a task with probability proportional to (its number of rows) ** alpha,
    then a row of that task uniformly. alpha = 0: every task equally likely (GenEval's score weighs every
    task alike, and position prompts are most of the train split); alpha = 1: rows uniformly. In between,
    the many-prompt tasks (position, color_attr: bindings to learn) get more of the draws, without the
    two single_object prompts vanishing."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["tag"], []).append(r)
    groups = list(by_task.values())
    if alpha == 0:
        tasks = rng.integers(0, len(groups), n)
    else:
        w = np.array([len(g) for g in groups], dtype=float) ** alpha
        tasks = rng.choice(len(groups), n, p=w / w.sum())
    return [groups[t][rng.integers(len(groups[t]))] for t in tasks]


# ---- stage 1: VQ tokenizer --------------------------------------------------------------------------
def vq_quantize(vq, pixels: torch.Tensor):
    """Encoder -> nearest l2-normalised code. Returns (straight-through latents, codes, codebook loss)."""
    z, codebook, codes = vq_nearest_codes(vq, pixels)
    q = codebook[codes]
    loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
    return (z + (q - z).detach()).permute(0, 3, 1, 2), codes, loss


def train_vq(model: JanusModel, rows: list[dict], steps: int, batch: int = 16, lr: float = 2e-3, seed: int = 0,
             log=print) -> None:
    vq = model.model.model.vqmodel
    vq.train()
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    usage = torch.zeros(vq.quantize.num_embeddings, device=vq.device)
    t0 = time.perf_counter()
    for step in range(steps):
        images = render_batch(task_balanced(rows, batch, rng), rng)
        x = to_pixels(images).to(vq.device)
        zq, codes, q_loss = vq_quantize(vq, x)
        rec = vq.decoder(vq.post_quant_conv(zq))
        # background is the per-image median colour; pixels away from it are object pixels
        bg = x.flatten(2).median(-1).values[..., None, None]
        weight = 1 + 9 * ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
        loss = (weight * ((rec - x).abs() + (rec - x) ** 2)).mean() + q_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(codes.flatten(), minlength=usage.numel())
        if (step + 1) % 50 == 0:  # restart codes unused for 50 steps at random current latents
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = F.normalize(vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, vq.quantize.embedding_dim), dim=-1)
                    vq.quantize.embedding.weight[dead] = z[torch.randint(0, len(z), (len(dead),))]
            log(f"vq step {step + 1}/{steps} loss {loss.item():.4f} codes used {(usage > 0).sum().item()} "
                f"dead restarted {len(dead)} ({time.perf_counter() - t0:.0f}s)")
            usage.zero_()
    vq.eval()


@torch.no_grad()
def vq_round_trip_accuracy(model: JanusModel, rows: list[dict], n: int = 128, seed: int = 1) -> float:
    """Share of VQ round trips of fresh renders that the oracle still accepts: the ceiling of Gen."""
    rng = np.random.default_rng(seed)
    picked = task_balanced(rows, n, rng)
    images = model.decode(model.encode_images(render_batch(picked, rng)))
    return float(np.mean([judge(img, r) for img, r in zip(images, picked)]))


# ---- stage 2: language model ------------------------------------------------------------------------
@dataclass
class Judged:
    """Understanding examples: (prompt, image, oracle label) triples."""
    prompts: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int, the oracle's verdict on that exact image
    own: np.ndarray | None = None  # (N,) bool, True for the model's own generations (default: none are)

    def __post_init__(self):
        if self.own is None:
            self.own = np.zeros(len(self.labels), bool)

    def __add__(self, other: "Judged") -> "Judged":
        return Judged(self.prompts + other.prompts, np.concatenate([self.images, other.images]),
                      np.concatenate([self.labels, other.labels]), np.concatenate([self.own, other.own]))

    def batch(self, n: int, rng: np.random.Generator, own_positive_share: float | None = None) -> np.ndarray:
        """n indices: half renders, label-balanced, half the model's own generations.

        The pool is mostly negatives (hard negatives, and a young generator's own images are mostly wrong):
        sampled uniformly, the cheapest answer is 'always 0'. Renders are balanced so that the verdict has to
        be read from the image. Own generations keep by default their natural share of right and wrong
        images, the distribution the judge is measured on (its accuracy on its own generations); with
        `own_positive_share` the accepted ones make up that share of them instead: a generator that is right
        on 5% of its images otherwise teaches its judge that rejecting every own image is nearly free."""
        renders = [np.flatnonzero(~self.own & (self.labels == y)) for y in (0, 1)]
        own = np.flatnonzero(self.own)
        n_own = n // 2 if len(own) else 0
        picks = [rng.choice(g, size) for g, size in zip(renders, ((n - n_own) // 2, n - n_own - (n - n_own) // 2)) if len(g)]
        own_right = own[self.labels[own] == 1]
        if n_own and own_positive_share is not None and 0 < len(own_right) < len(own):
            n_right = int(round(n_own * own_positive_share))
            picks += [rng.choice(own_right, n_right), rng.choice(own[self.labels[own] == 0], n_own - n_right)]
        elif n_own:
            picks.append(rng.choice(own, n_own))
        return np.concatenate(picks)


def oracle_labelled(model: JanusModel, rows: list[dict], tokens: torch.Tensor, own: bool = False) -> Judged:
    images = decode_batched(model, tokens)
    labels = np.array([int(judge(img, r)) for img, r in zip(images, rows)])
    return Judged([r["prompt"] for r in rows], images, labels, np.full(len(labels), own))


@torch.no_grad()
def decode_batched(model: JanusModel, tokens: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([model.decode(tokens[i:i + batch]) for i in range(0, len(tokens), batch)])


def judged_pool(model: JanusModel, rows: list[dict], rng: np.random.Generator, per_prompt: int = 2) -> Judged:
    """VQ round trips of positives, of hard negatives (perturbed prompts) and of positives with corrupted
    tokens, each labelled by the oracle against the original prompt."""
    from gapray.world.grammar import perturbations

    subjects, metas = [], []
    for r in rows:
        for _ in range(per_prompt):
            subjects.append(r), metas.append(r)  # positive
            kinds = [m for ms in perturbations(r, rng).values() for m in ms]
            subjects.append(r), metas.append(kinds[rng.integers(len(kinds))])  # hard negative
    tokens = model.encode_images(render_batch(metas, rng))
    n_codes = model.model.model.vqmodel.quantize.num_embeddings
    corrupted = tokens[0::2].clone()  # from the positives: a few tokens replaced by random codes
    for row in corrupted:
        k = int(rng.integers(1, 10))
        row[torch.from_numpy(rng.choice(row.numel(), k, replace=False))] = torch.from_numpy(rng.integers(0, n_codes, k))
    return oracle_labelled(model, subjects, tokens) + oracle_labelled(model, subjects[0::2], corrupted)


def self_generated_pool(model: JanusModel, rows: list[dict], k: int, seed: int,
                        sampling: SamplingParams = SamplingParams()) -> Judged:
    """The model's own generations for train prompts, labelled by the oracle."""
    from gapray.models.sampler import image_seed

    tokens = []
    for i in range(0, len(rows), 32):
        batch = rows[i:i + 32]
        seeds = [image_seed(seed, r["prompt_id"], j) for r in batch for j in range(k)]
        tokens.append(model.sample([r["prompt"] for r in batch], k, sampling, seeds).tokens)
    return oracle_labelled(model, [r for r in rows for _ in range(k)], torch.cat(tokens), own=True)


def answer_text(model: JanusModel, label: int) -> str:
    return f" {ANSWER_PREFIX} {label} .{model.tokenizer.eos_token}"


def understanding_loss(model: JanusModel, pool: Judged, idx: np.ndarray, format_weight: float = 0.1) -> torch.Tensor:
    """Cross-entropy on the answer 'The score is X .<eos>' after the verbatim verdict question.

    The digit X is the only token that depends on the image; it gets full weight, the fixed format
    tokens `format_weight`. (Averaged over all six, the digit's gradient is a sixth of the loss and
    gradient clipping, dominated by the generation loss, all but erases it: understanding then stays at
    chance.)"""
    texts = [model.verdict_text(pool.prompts[i]) + answer_text(model, int(pool.labels[i])) for i in idx]
    enc = model.understanding_inputs(texts, pool.images[idx])
    answer = model.tokenizer.encode(answer_text(model, 1), add_special_tokens=False)
    n = len(answer)
    digit = answer.index(model.tokenizer.convert_tokens_to_ids("1"))
    # left padding: the answer is the last n tokens of every row, predicted by the n positions before them
    logits = model.model(**enc, logits_to_keep=n + 1).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), enc["input_ids"][:, -n:].reshape(-1),
                         reduction="none").view(len(idx), n)
    weights = torch.full((n,), format_weight, device=ce.device)
    weights[digit] = 1.0
    return (ce * weights).sum(1).mean()  # the digit's cross-entropy + format_weight x each format token's


def caption_loss(model: JanusModel, pool: Judged, idx: np.ndarray) -> torch.Tensor:
    """Describe an image the oracle accepted with its prompt: dense token-level supervision of what the
    vision encoder sees (colours, shapes, counts, places), i.e. log p(prompt | image), the paper's theoretical
    notion of understanding. A verdict bit alone is too weak a signal for a vision tower trained from scratch."""
    idx = idx[pool.labels[idx] == 1]
    if len(idx) == 0:
        return torch.zeros(())
    texts = [model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_REQUEST}]}],
        add_generation_prompt=True) + f" {pool.prompts[i]}{model.tokenizer.eos_token}" for i in idx]
    enc = model.understanding_inputs(texts, pool.images[idx])
    labels = torch.full_like(enc["input_ids"], -100)
    for row, i in enumerate(idx):  # left padding: each caption is the last len(caption) tokens of its row
        n = len(model.tokenizer.encode(f" {pool.prompts[i]}{model.tokenizer.eos_token}", add_special_tokens=False))
        labels[row, -n:] = enc["input_ids"][row, -n:]
    return model.model(**enc, labels=labels).loss


def generation_loss(model: JanusModel, rows: list[dict], rng: np.random.Generator, p_uncond: float = 0.1) -> torch.Tensor:
    """NLL of a fresh render's image tokens given the prompt; with probability p_uncond the prompt is
    replaced by CFG's unconditional row, so the model learns the unconditional distribution too."""
    from gapray.models.janus import image_token_logprobs
    from gapray.models.sampler import uncond_input_ids

    tokens = model.encode_images(render_batch(rows, rng))
    enc = model.generation_inputs([r["prompt"] for r in rows])
    ids = enc["input_ids"]
    drop = torch.from_numpy(rng.random(len(rows)) < p_uncond).to(ids.device)
    ids = torch.where(drop[:, None], uncond_input_ids(ids, [model.bos_id, model.boi_id], model.pad_id), ids)
    return -image_token_logprobs(model.model, ids, enc["attention_mask"], tokens.to(ids.device)).mean()


def dev_check(model: JanusModel, rows: list[dict], k: int = 4, seed: int = 99) -> dict:
    """Gen./Und./Non. on train-split prompts with `gapray measure`'s own sample-and-score (never eval)."""
    from gapray.judges.oracle import OracleJudge
    from gapray.selfjudge import sample_and_score, summarize
    from gapray.prompts import Prompt

    prompts = [Prompt(r["prompt_id"], r["tag"], r["prompt"], r) for r in rows]
    out = []
    for i in range(0, len(prompts), 32):
        out += sample_and_score(model, prompts[i:i + 32], k, SamplingParams(), seed, judge=OracleJudge())
    s = summarize(out)
    o = s["oracle"]["overall"]
    fa = o["false_acceptance_rate"]["value"]
    return {"non_unification": round(s["non_unification"], 3), "gen": o["generation_accuracy"]["value"],
            "geneval": s["oracle"]["geneval_score"]["value"], "und": o["understanding_accuracy"]["value"],
            "und_balanced": o["understanding_balanced_accuracy"]["value"],
            "precision": None if fa is None else 1 - fa, "weak_gen": o["weak_generation_rate"]["value"]}


def train_lm(model: JanusModel, rows: list[dict], steps: int, gen_batch: int = 32, und_batch: int = 16,
             lr: float = 1e-3, self_generated_at: tuple[float, ...] = (0.5, 0.75), self_generated_k: int = 2,
             dev_rows: list[dict] | None = None, seed: int = 0, log=print, on_dev_check=None,
             pool_prompts: int = 2000, self_generated_prompts: int = 512, checks: int = 4,
             task_alpha: float = 0.0, own_positive_share: float | None = None) -> None:
    """Both objectives every step; the understanding pool grows with the model's own generations at the
    given fractions of training, so the judge sees what the generator actually draws. Prompts are drawn
    task-balanced (pool_prompts for the render pool, self_generated_prompts x self_generated_k own images
    per refresh; `task_alpha`: see task_balanced; `own_positive_share`: see Judged.batch). `on_dev_check(step)`
    runs after each of the `checks` progress checks (the job saves the model there)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = [p for n, p in model.model.named_parameters() if ".vqmodel." not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / steps))))
    pool = judged_pool(model, task_balanced(rows, pool_prompts, rng, task_alpha), rng, per_prompt=1)
    log(f"understanding pool: {len(pool.labels)} examples, {pool.labels.mean():.2f} positive")
    grow_at = {int(f * steps) for f in self_generated_at}
    t0 = time.perf_counter()
    for step in range(steps):
        if step in grow_at:
            model.model.eval()
            picked = list({r["prompt_id"]: r for r in task_balanced(rows, self_generated_prompts, rng, task_alpha)}.values())
            own = self_generated_pool(model, picked, self_generated_k, seed=seed * 1000 + step)
            pool = pool + own
            log(f"step {step}: + {len(own.labels)} own generations ({own.labels.mean():.2f} accepted by the oracle); "
                f"pool {len(pool.labels)}, {pool.labels[pool.own].sum()} accepted own generations")
        model.model.train()
        model.model.model.vqmodel.eval()
        loss_g = generation_loss(model, task_balanced(rows, gen_batch, rng, task_alpha), rng)
        loss_u = understanding_loss(model, pool, pool.batch(und_batch, rng, own_positive_share))
        loss_c = caption_loss(model, pool, rng.integers(0, len(pool.labels), und_batch))
        opt.zero_grad()
        (loss_g + loss_u + loss_c).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log(f"lm step {step + 1}/{steps} gen {loss_g.item():.3f} und {loss_u.item():.3f} caption {loss_c.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
        if dev_rows and (step + 1) % max(1, steps // checks) == 0:
            model.model.eval()
            log(f"dev (train prompts) at step {step + 1}: {dev_check(model, dev_rows)}")
            if on_dev_check is not None:
                on_dev_check(step + 1)
    model.model.eval()
