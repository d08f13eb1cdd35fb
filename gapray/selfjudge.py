"""The Ray-free self-judging core: sample -> decode -> self-judge -> verdict rows -> summary.

One image's seed is a function of (run seed, prompt id, sample index) alone (`image_seed`), so an image never
depends on batching, replicas or workers. `verdict_rows` is the one place verdict rows are built: the local loop
(`sample_and_score`), the Ray pipeline's score stage (gapray/data/pipeline.py) and the Serve replicas all call
into this module, which imports none of them. (Issue 17 moves the world's oracle out of here, injected as an
external judge; today it is called directly for prompts with world metadata.)
"""

from __future__ import annotations

from gapray.metrics import by_task, geneval_score, non_unification, oracle_figures
from gapray.models import SampleOutput, SamplingParams, ScoreOutput, UnifiedModel
from gapray.models.sampler import derive_seed
from gapray.prompts import Prompt
from gapray.verdict import to_verdict
from gapray.world import in_world, judge as oracle_judge


def image_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """The seed of one image: a function of (run seed, prompt id, sample index) alone."""
    return derive_seed(seed, prompt_id, sample_idx)


def sample_and_score(model: UnifiedModel, prompts: list[Prompt], k: int, sampling: SamplingParams,
                     seed: int, score_mode: str = "logits", threshold: float = 0.5) -> list[dict]:
    """K images per prompt, each judged by the same model: one verdict row per image."""
    return sample_and_score_images(model, [(p, list(range(k))) for p in prompts], sampling, seed, score_mode, threshold)


def sample_and_score_images(model: UnifiedModel, todo: list[tuple[Prompt, list[int]]], sampling: SamplingParams,
                            seed: int, score_mode: str = "logits", threshold: float = 0.5) -> list[dict]:
    """The images (prompt, sample indices) names, each drawn with its own seed and judged by the same model."""
    flat = [p for p, idx in todo for _ in idx]
    sample_idx = [j for _, idx in todo for j in idx]
    seeds = [image_seed(seed, p.prompt_id, j) for p, j in zip(flat, sample_idx)]
    out = model.sample([p.prompt for p in flat], 1, sampling, seeds)  # per-row seeds: batching changes nothing
    return judge_samples(model, flat, sample_idx, out, score_mode, threshold)


def judge_samples(model: UnifiedModel, flat: list[Prompt], sample_idx: list[int], out: SampleOutput,
                  score_mode: str = "logits", threshold: float = 0.5) -> list[dict]:
    """Decode sampled images (drawn now, or read back from a ledger) and judge them with the model."""
    images = model.decode(out.tokens)
    judged = model.score([p.prompt for p in flat], images, mode=score_mode)
    return verdict_rows(flat, sample_idx, out, images, judged, threshold)


def verdict_rows(flat: list[Prompt], sample_idx: list[int], out: SampleOutput, images, judged: ScoreOutput,
                 threshold: float) -> list[dict]:
    """Row i of the sample output, its image and its judgement -> one verdict row (VERDICT_SCHEMA).

    The one place verdict rows are built: `sample_and_score` here and the Ray pipeline's score stage
    (which gets sample and score answers from Serve separately) both call it. `images[i]` is read only
    for prompts the shapes-world oracle can judge, so callers may pass None for the others.
    """
    rows = []
    for i, p in enumerate(flat):
        pa = float(judged.p_aligned[i])
        oracle = int(oracle_judge(images[i], p.meta)) if in_world(p.meta) else None
        rows.append({
            "prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt, "sample_idx": int(sample_idx[i]),
            "seed": out.seeds[i], "image_tokens": out.tokens[i].tolist(),
            "logprob": float(out.logprobs[i].sum()), "p_aligned": pa,
            "verdict": to_verdict(pa, threshold), "answer": judged.answers[i], "oracle_verdict": oracle,
        })
    return rows


def summarize(rows: list[dict]) -> dict:
    nu = by_task(rows, lambda g: non_unification([r["verdict"] for r in g]))
    summary = {"non_unification": nu["overall"]["value"], "overall": nu["overall"], "per_task": nu["per_task"]}
    if any(r["oracle_verdict"] is not None for r in rows):
        summary["oracle"] = by_task(rows, oracle_figures)
        summary["oracle"]["geneval_score"] = geneval_score(summary["oracle"]["per_task"])
    return summary
