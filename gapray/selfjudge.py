"""The Ray-free self-judging core: sample -> decode -> self-judge -> verdict rows -> summary.

One image's seed is a function of (run seed, prompt id, sample index) alone (gapray.models.sampler.image_seed), so an image never
depends on batching, replicas or workers. `verdict_rows` is the one place verdict rows are built: the local loop
(`sample_and_score`), the Ray pipeline's score stage (gapray/backends/ray.py) and the Serve replicas all call
into this module, which imports none of them.

The external judge is injected (`judge`: a gapray.judges.ExternalJudge: the shapes world's oracle, a VLM, or None
for none), built by the caller from config (gapray.judges.build_judge); this module imports no judge and never
the world. It is asked once per batch, for the prompts it `covers`; its verdict goes to the `oracle_verdict`
column (a historical name) with `judge_model` and `judge_p`.
"""

from __future__ import annotations

from gapray.metrics import by_task, geneval_score, non_unification, oracle_figures
from gapray.models import SampleOutput, SamplingParams, ScoreOutput, UnifiedModel
from gapray.models.sampler import image_seed
from gapray.prompts import Prompt
from gapray.verdict import to_verdict


def sample_and_score(model: UnifiedModel, prompts: list[Prompt], k: int, sampling: SamplingParams,
                     seed: int, score_mode: str = "logits", threshold: float = 0.5, judge=None) -> list[dict]:
    """K images per prompt, each judged by the same model (and by `judge`, if any): one verdict row per image."""
    return sample_and_score_images(model, [(p, list(range(k))) for p in prompts], sampling, seed, score_mode,
                                   threshold, judge)


def sample_and_score_images(model: UnifiedModel, todo: list[tuple[Prompt, list[int]]], sampling: SamplingParams,
                            seed: int, score_mode: str = "logits", threshold: float = 0.5, judge=None) -> list[dict]:
    """The images (prompt, sample indices) names, each drawn with its own seed and judged by the same model."""
    flat = [p for p, idx in todo for _ in idx]
    sample_idx = [j for _, idx in todo for j in idx]
    seeds = [image_seed(seed, p.prompt_id, j) for p, j in zip(flat, sample_idx)]
    out = model.sample([p.prompt for p in flat], 1, sampling, seeds)  # per-row seeds: batching changes nothing
    return judge_samples(model, flat, sample_idx, out, score_mode, threshold, judge)


def judge_samples(model: UnifiedModel, flat: list[Prompt], sample_idx: list[int], out: SampleOutput,
                  score_mode: str = "logits", threshold: float = 0.5, judge=None) -> list[dict]:
    """Decode sampled images (drawn now, or read back from a ledger) and judge them with the model (and `judge`)."""
    images = model.decode(out.tokens)
    judged = model.score([p.prompt for p in flat], images, mode=score_mode)
    return verdict_rows(flat, sample_idx, out, images, judged, threshold, judge)


def external_verdicts(judge, flat: list[Prompt], images) -> list[tuple[int | None, float | None, str | None]]:
    """(verdict, p, judge name) per row: one judge call for the rows whose prompts it covers, (None, None, None)
    for the others (and for every row without a judge)."""
    none = (None, None, None)
    if judge is None:
        return [none] * len(flat)
    covered = [i for i, p in enumerate(flat) if judge.covers(p)]
    answers = judge([images[i] for i in covered], [flat[i] for i in covered]) if covered else []
    out = [none] * len(flat)
    for i, (v, p) in zip(covered, answers):
        out[i] = (None if v is None else int(v), None if p is None else float(p), judge.name)
    return out


def verdict_rows(flat: list[Prompt], sample_idx: list[int], out: SampleOutput, images, judged: ScoreOutput,
                 threshold: float, judge=None) -> list[dict]:
    """Row i of the sample output, its image and its judgements -> one verdict row (VERDICT_SCHEMA).

    The one place verdict rows are built: `sample_and_score` here and the Ray pipeline's score stage
    (which gets sample and score answers from Serve separately) both call it. `images[i]` is read only
    for prompts the external judge covers, so callers may pass None for the others.
    """
    external = external_verdicts(judge, flat, images)
    rows = []
    for i, p in enumerate(flat):
        pa = float(judged.p_aligned[i])
        ext, ext_p, ext_name = external[i]
        rows.append({
            "prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt, "sample_idx": int(sample_idx[i]),
            "seed": out.seeds[i], "image_tokens": out.tokens[i].tolist(),
            "logprob": float(out.logprobs[i].sum()), "p_aligned": pa,
            "verdict": to_verdict(pa, threshold), "answer": judged.answers[i],
            "oracle_verdict": ext, "judge_model": ext_name, "judge_p": ext_p,
        })
    return rows


def judge_name(rows: list[dict]) -> str | None:
    """Which external judge gave the rows' verdicts: its judge_model; "oracle" for rows written before that
    column existed (the oracle was then the only external judge); None when no row has an external verdict."""
    names = sorted({r.get("judge_model") or "oracle" for r in rows if r.get("oracle_verdict") is not None})
    return ", ".join(names) if names else None


def summarize(rows: list[dict]) -> dict:
    """Non-unification overall and per task; with external verdicts, the judge's figures (key "oracle", a
    historical name: Gen., understanding, weak generation, false acceptance, GenEval) and `judge_model`."""
    nu = by_task(rows, lambda g: non_unification([r["verdict"] for r in g]))
    summary = {"non_unification": nu["overall"]["value"], "overall": nu["overall"], "per_task": nu["per_task"]}
    if any(r["oracle_verdict"] is not None for r in rows):
        summary["oracle"] = by_task(rows, oracle_figures)
        summary["oracle"]["geneval_score"] = geneval_score(summary["oracle"]["per_task"])
        summary["judge_model"] = judge_name(rows)
    return summary
