"""`gapray measure`: how often does a model reject its own images? (PAPER.md, non-unification score)

For every prompt: sample K images (our CFG sampler, one seed per image), decode them, ask the same
model the verdict question about each, and record one row per image. Outputs in the run directory:
  verdicts.parquet  one row per image (schema: gapray.data.schemas.VERDICT_SCHEMA)
  summary.json      non-unification overall and per task, with counts and 95% Wilson intervals; with an
                    external judge (judge.kind: the shapes oracle for world prompts, or a VLM for any
                    prompt), also its figures under "oracle" (generation accuracy, understanding accuracy,
                    weak-generation and false-acceptance rates), per task and overall, GenEval's overall
                    score (the mean of the per-task generation accuracies), and which judge (`judge_model`)
  grids/<task>.png  images with their verdicts drawn on them

The unit of work of both backends is in gapray/selfjudge.py (the Ray-free core): the local loop here calls
`sample_and_score`, and the Ray pipeline (gapray/backends/ray.py) builds its rows with the same
`verdict_rows`, so the two backends compute the same rows for the same seeds.
Assumes the whole verdict table fits in memory (it holds token ids, not pixels).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gapray.config import judge_kind
from gapray.data.integrity import publish
from gapray.data.schemas import to_table
from gapray.errors import UserError
from gapray.judges import build_judge
from gapray.models.loading import check_model, load_model
from gapray.models import SamplingParams, UnifiedModel
from gapray.preflight import check_measure
from gapray.prompts import Prompt, load_prompts
from gapray.selfjudge import sample_and_score, summarize

OUTPUTS = ("verdicts.parquet", "summary.json")


def measure_local(cfg: DictConfig, model: UnifiedModel, prompts: list[Prompt], judge=None) -> list[dict]:
    sampling = SamplingParams(**OmegaConf.to_container(cfg.sampling))
    rows = []
    bar = tqdm(total=len(prompts) * cfg.images_per_prompt, unit="img", desc="sample+score", dynamic_ncols=True)
    for start in range(0, len(prompts), cfg.batch_prompts):
        batch = prompts[start:start + cfg.batch_prompts]
        rows += sample_and_score(model, batch, cfg.images_per_prompt, sampling, cfg.seed,
                                 cfg.scoring.mode, cfg.scoring.threshold, judge)
        bar.update(len(batch) * cfg.images_per_prompt)
    bar.close()
    return rows


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier run's outputs unless asked: nothing already written is lost."""
    existing = [name for name in OUTPUTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"run_dir '{run_dir}' already holds {', '.join(existing)}; choose another run_dir "
                        f"or pass overwrite=true to replace them")


def write_atomic(path: Path, write) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written output."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run_measure(cfg: DictConfig) -> dict:
    OmegaConf.to_object(cfg)  # the schema's last check (e.g. a null for a required value)
    prompts = load_prompts(cfg.prompts, task=cfg.task, limit=cfg.max_prompts)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, cfg.overwrite)
    check_measure(cfg)  # GPUs asked for where there are none, an unwritable run_dir, an unreachable hub id
    # backend=ray: the Serve replicas load the model (a Janus-Pro-7B need not fit where the driver runs);
    # here only its path is checked. backend=local: loaded before any directory is made, so that a failed
    # start leaves nothing behind.
    if cfg.backend == "ray":
        check_model(cfg.model)
        model = judge = None  # the replicas (and a VLM's JudgeServer) judge: gapray/backends/ray.py
    else:
        model = load_model(cfg.model)
        judge = build_judge(cfg)  # the external judge beside the policy (None: judge.kind=none)
    t0 = time.perf_counter()

    def write_outputs(rows: list[dict], decode) -> dict:
        """verdicts.parquet, summary.json, config.yaml, grids/ (`decode`: image tokens -> RGB arrays)."""
        seconds = time.perf_counter() - t0
        kind = judge_kind(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".verdicts.parquet.tmp"
        pq.write_table(to_table(rows), tmp)
        publish(tmp, run_dir / "verdicts.parquet")  # atomically, with its manifest entry (gapray.data.integrity)
        summary = {**summarize(rows), "model": cfg.model.path, "prompts": cfg.prompts,
                   "n_prompts": len(prompts), "images_per_prompt": cfg.images_per_prompt,
                   "n_images": len(rows), "score_mode": cfg.scoring.mode, "threshold": cfg.scoring.threshold,
                   "judge": {"kind": kind, "model": cfg.judge.model if kind == "vlm" else kind,
                             "mode": cfg.judge.mode},
                   "seed": cfg.seed, "seconds": round(seconds, 2),
                   "images_per_second": round(len(rows) / seconds, 3) if seconds else None}
        write_atomic(run_dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
        write_atomic(run_dir / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg)))

        from gapray.report import write_verdict_grids
        write_verdict_grids(decode, rows, run_dir / "grids", cfg.grid_prompts)
        return summary

    if cfg.backend == "ray":
        from gapray.backends.ray import measure_ray
        return measure_ray(cfg, prompts, write_outputs)
    return write_outputs(measure_local(cfg, model, prompts, judge), model.decode)

