"""Which SFT data raises held-out Gen.? `python jobs/probe_sft.py [key=value ...] [run.KEY=VALUE ...]`

The headroom check and the recipe probe of the shapes world (README, "The shapes world"), on the train split
only: the dev prompts (grammar.dev_split, the ones pretraining held out for its progress checks) are measured,
never trained on; the eval and composition splits are never touched, so this may be used to choose a recipe.

  1. the base model on the dev prompts (dev_images each): Gen., GenEval score, understanding;
  2. `train_prompts` other train prompts (task-balanced): N own candidates each (run.images_per_prompt), drawn
     and self-judged as jobs/self_improve.py's sample phase does, and judged by the oracle;
  3. one SFT run of the base model per variant, with the self-improvement recipe (conf/self_improve.yaml's
     train, run.train.KEY=VALUE to change it), then the dev measure again:
       render  fresh true renders of the train prompts (renders_per_prompt each): the headroom check, a model
               this cannot raise cannot show the paper's effect whatever the judge
       oracle  the candidates the oracle accepts: the upper bound of self-improvement's data
       self    the candidates the model itself accepts: the paper's data
     Training rows carry re-encoded image tokens (decode, then encode), as data.reencode_images does.
Prints one table with both sides (base and each variant) and the share of the oracle's gain that self-chosen
data reaches; writes out_dir/probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.errors import UserError  # noqa: E402


def dev_measure(base, model, prompts, k: int) -> dict:
    from gapray.judges.oracle import OracleJudge
    from gapray.selfjudge import sample_and_score, summarize
    from gapray.models import SamplingParams
    from omegaconf import OmegaConf

    sampling = SamplingParams(**OmegaConf.to_container(base.sampling))
    rows = []
    for i in range(0, len(prompts), base.batch_prompts):
        rows += sample_and_score(model, prompts[i:i + base.batch_prompts], k, sampling, base.seed + 1000,
                                 base.scoring.mode, base.scoring.threshold, judge=OracleJudge())
    s = summarize(rows)
    o = s["oracle"]["overall"]
    return {"gen": o["generation_accuracy"]["value"], "geneval": s["oracle"]["geneval_score"]["value"],
            "und_balanced": o["understanding_balanced_accuracy"]["value"], "non": s["non_unification"],
            "n_images": len(rows),
            "gen_per_task": {t: v["generation_accuracy"]["value"] for t, v in s["oracle"]["per_task"].items()}}


def sft_rows(model, prompts, base, variants, renders_per_prompt: int) -> dict[str, list[dict]]:
    """{variant: SFT rows} from N own candidates per prompt (and fresh renders for `render`)."""
    import numpy as np
    import torch

    from gapray.judges.oracle import OracleJudge
    from gapray.selfjudge import sample_and_score
    from gapray.models import SamplingParams
    from gapray.world.pretrain import render_batch
    from omegaconf import OmegaConf

    sampling = SamplingParams(**OmegaConf.to_container(base.sampling))
    out = {v: [] for v in variants}
    cands = []
    if {"oracle", "self"} & set(variants):
        for i in range(0, len(prompts), base.batch_prompts):
            cands += sample_and_score(model, prompts[i:i + base.batch_prompts], base.images_per_prompt, sampling,
                                      base.seed, base.scoring.mode, base.scoring.threshold, judge=OracleJudge())
    for variant, key in (("oracle", "oracle_verdict"), ("self", "verdict")):
        if variant in variants:
            kept = [r for r in cands if r[key] == 1]
            tokens = model.reencode(torch.tensor([r["image_tokens"] for r in kept])) if kept else []
            out[variant] = [{"round": 0, "prompt_id": r["prompt_id"], "task": r["task"], "prompt": r["prompt"],
                             "sample_idx": r["sample_idx"], "p_aligned": r["p_aligned"],
                             "image_tokens": list(map(int, t))} for r, t in zip(kept, tokens)]
    if "render" in variants:
        flat = [p for p in prompts for _ in range(renders_per_prompt)]
        tokens = model.encode_images(render_batch([p.meta for p in flat], np.random.default_rng(base.seed)))
        out["render"] = [{"round": 0, "prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt,
                          "sample_idx": j % renders_per_prompt, "p_aligned": 1.0, "image_tokens": list(map(int, t))}
                         for j, (p, t) in enumerate(zip(flat, tokens))]
    out["candidates"] = cands  # for the counts
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from gapray.config import (CONF_DIR, PROBE_VARIANTS, ProbeConfig, SelfImproveConfig, TrainConfig, check_values,
                               load_config)
    from gapray.models.loading import load_model
    from gapray.data.schemas import SFT_SCHEMA
    from gapray.prompts import load_prompts
    from gapray.train import run_training
    from gapray.world.grammar import dev_split
    from gapray.world.pretrain import task_balanced

    parser = argparse.ArgumentParser(prog="jobs/probe_sft.py", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value (train_prompts=240, variants=[render]) or run.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ProbeConfig, None, [o for o in args.overrides if not o.startswith("run.")])
        bad = sorted(set(cfg.variants) - set(PROBE_VARIANTS))
        if bad:
            raise UserError(f"variants: unknown {bad}; valid: {', '.join(PROBE_VARIANTS)}")
        base = load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml",
                           list(cfg.run) + [o[len("run."):] for o in args.overrides if o.startswith("run.")])
        out_dir = Path(cfg.out_dir)
        if (out_dir / "probe.json").exists() and not cfg.overwrite:
            raise UserError(f"out_dir '{out_dir}' already holds probe.json; choose another out_dir or pass overwrite=true")
        prompts = load_prompts(base.prompts)
        if any(p.meta is None for p in prompts):
            raise UserError(f"run.prompts: '{base.prompts}' has rows without world metadata; the probe needs the "
                            f"shapes world's oracle (a GenEval JSONL of world prompts)")
        by_id = {p.prompt_id: p for p in prompts}
        rest, dev = dev_split([{**p.meta, "tag": p.task, "prompt_id": p.prompt_id} for p in prompts], cfg.dev_prompts)
        rng = np.random.default_rng(base.seed)
        picked = list({r["prompt_id"]: r for r in task_balanced(rest, 4 * cfg.train_prompts, rng)}.values())
        train_prompts = [by_id[r["prompt_id"]] for r in picked[:cfg.train_prompts]]
        dev_prompts = [by_id[r["prompt_id"]] for r in dev]
        model = load_model(base.model)
    except UserError as e:
        print(f"jobs/probe_sft.py: error: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    results = {"base": {"rows": 0, **dev_measure(base, model, dev_prompts, cfg.dev_images)}}
    data = sft_rows(model, train_prompts, base, cfg.variants, cfg.renders_per_prompt)
    cands = data.pop("candidates")
    for name in cfg.variants:
        rows = data[name]
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), d / "sft.parquet")
        tcfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(base.train), {
            "model": OmegaConf.to_container(base.model), "data": str(d), "objective": "sft",
            "run_dir": str(d / "train"), "overwrite": True})
        check_values(tcfg)
        trained = run_training(tcfg)
        results[name] = {"rows": len(rows), **dev_measure(base, load_model(OmegaConf.merge(base.model, {"path": trained.model_dir})),
                                                            dev_prompts, cfg.dev_images)}
    results["meta"] = {"train_prompts": len(train_prompts), "dev_prompts": len(dev_prompts), "candidates": len(cands),
                       "self_accepted": sum(r["verdict"] == 1 for r in cands),
                       "oracle_accepted": sum(r["oracle_verdict"] == 1 for r in cands),
                       "self_precision": (sum(r["verdict"] == 1 and r["oracle_verdict"] == 1 for r in cands)
                                          / max(1, sum(r["verdict"] == 1 for r in cands))),
                       "recipe": OmegaConf.to_container(base.train), "seconds": round(time.perf_counter() - t0)}
    (out_dir / "probe.json").write_text(json.dumps(results, indent=1))
    b = results["base"]
    print(f"\nSFT of {base.model.path} on {len(train_prompts)} train prompts, measured on {len(dev_prompts)} held-out dev "
          f"prompts ({cfg.dev_images} images each), %; candidates: N = {base.images_per_prompt}, self-precision "
          f"{100 * results['meta']['self_precision']:.1f}:")
    print("| data | rows | dev Gen. | gain | GenEval score | und. balanced | Non. |\n|---|---:|---:|---:|---:|---:|---:|")
    for name in ["base", *cfg.variants]:
        r = results[name]
        print(f"| {name} | {r['rows']} | {100 * r['gen']:.1f} | {100 * (r['gen'] - b['gen']):+.1f} | {100 * r['geneval']:.1f} "
              f"| {100 * (r['und_balanced'] or 0):.1f} | {100 * r['non']:.1f} |")
    if {"oracle", "self"} <= set(cfg.variants) and results["oracle"]["gen"] > b["gen"]:
        share = (results["self"]["gen"] - b["gen"]) / (results["oracle"]["gen"] - b["gen"])
        print(f"self-chosen data reaches {100 * share:.0f}% of the oracle-chosen data's gain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
