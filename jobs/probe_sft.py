"""Why self-improvement does not raise the shapes model's Gen.: one SFT pass on four data sources, measured on
the very prompts trained on. `python jobs/probe_sft.py run_dir=runs/reproduce/seed=0/sft [key=value ...]`

Takes a finished self-improvement run's round-0 ledger (the base model's own images of the train prompts, with
its verdicts and the oracle's) and trains the base model, with that run's training recipe, once on each of:
  self           the images the model itself accepted, as sampled (the paper's data, token for token)
  self-reencoded the same pictures, VQ-encoded again (decode -> encode: what a trainer that reads images sees;
                 the default of jobs/self_improve.py, data.reencode_images)
  oracle         the images the oracle accepts, as sampled (an external judge, here a perfect one)
  oracle-reencoded  the same, VQ-encoded again
  render         fresh renders of oracle's prompts, VQ-encoded: the pretraining distribution itself
then measures each trained model, and the base model, on the train prompts (Gen., Non., understanding
accuracy; `images_per_prompt` each, seed `seed`). Train split only: the eval split is never touched, so this
may be used to choose a recipe. Prints one table, both sides in one run; writes out_dir/probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.errors import UserError  # noqa: E402

VARIANTS = ("self", "self-reencoded", "oracle", "oracle-reencoded", "render")


def build_variants(run_dir: Path, cfg, out_dir: Path) -> dict[str, int]:
    """out_dir/<variant>/sft.parquet for every variant; returns their row counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from gapray.config import load_model
    from gapray.data.ledger import VerdictLedger
    from gapray.data.schemas import SFT_SCHEMA
    from gapray.prompts import load_prompts
    from gapray.world.pretrain import render_batch

    model = load_model(cfg.model)
    meta = {p.prompt_id: p.meta for p in load_prompts(cfg.prompts, limit=cfg.max_prompts)}
    ledger = sorted(VerdictLedger(run_dir / "ledger").read(0).to_pylist(), key=lambda r: (r["prompt_id"], r["sample_idx"]))
    keys = ("round", "prompt_id", "task", "prompt", "sample_idx", "p_aligned")

    def table(rows: list[dict], tokens) -> pa.Table:
        return pa.Table.from_pylist([{**{k: r[k] for k in keys}, "image_tokens": list(map(int, t))}
                                     for r, t in zip(rows, tokens)], schema=SFT_SCHEMA)
    tables = {}
    for judge, key in (("self", "verdict"), ("oracle", "oracle_verdict")):
        rows = [r for r in ledger if r[key] == 1]
        sampled = torch.tensor([r["image_tokens"] for r in rows])
        tables[judge] = table(rows, sampled)
        tables[f"{judge}-reencoded"] = table(rows, model.reencode(sampled))
        if judge == "oracle":
            renders = render_batch([meta[r["prompt_id"]] for r in rows], np.random.default_rng(cfg.seed))
            tables["render"] = table(rows, model.encode_images(renders))
    for name, t in tables.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(t, out_dir / name / "sft.parquet")
    return {name: t.num_rows for name, t in tables.items()}


def measure(cfg, model_path: str, k: int) -> dict:
    """`gapray measure`'s local loop on the run's train prompts, `k` images each, with the run's sampling."""
    from omegaconf import OmegaConf

    from gapray.config import load_model
    from gapray.measure import measure_local, summarize
    from gapray.prompts import load_prompts

    model = load_model(OmegaConf.merge(cfg.model, {"path": model_path}))
    prompts = load_prompts(cfg.prompts, limit=cfg.max_prompts)
    rows = measure_local(OmegaConf.merge(cfg, {"images_per_prompt": k, "batch_prompts": 32}), model, prompts)
    s = summarize(rows)
    o = s["oracle"]["overall"]
    return {"gen": o["generation_accuracy"]["value"], "non": s["non_unification"],
            "und": o["understanding_accuracy"]["value"], "n_images": len(rows),
            "gen_per_task": {t: v["generation_accuracy"]["value"] for t, v in s["oracle"]["per_task"].items()}}


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from gapray.config import TrainConfig, check_values
    from gapray.train import run_training

    parser = argparse.ArgumentParser(prog="jobs/probe_sft.py", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="run_dir=<finished run> [out_dir=...] [images_per_prompt=2] "
                                                     "[seed=1] [train.optim.learning_rate=...]")
    args = dict(o.split("=", 1) for o in parser.parse_args(argv).overrides)
    try:
        run_dir = Path(args.pop("run_dir", ""))
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "ledger" / "round=0").is_dir():
            raise UserError(f"run_dir: '{run_dir}' is not a self-improvement run with a round-0 ledger; pass "
                            f"run_dir=<a finished jobs/self_improve.py run directory>")
        cfg = OmegaConf.load(run_dir / "config.yaml")
        out_dir = Path(args.pop("out_dir", str(run_dir / "probe_sft")))
        k = int(args.pop("images_per_prompt", 2))
        cfg.seed = int(args.pop("seed", 1))  # images the round-0 ledger does not hold
        train_overrides = {key[len("train."):]: v for key, v in args.items() if key.startswith("train.")}
        if len(train_overrides) != len(args):
            raise UserError(f"unknown keys {sorted(set(args) - {'train.' + t for t in train_overrides})}: "
                            f"use run_dir, out_dir, images_per_prompt, seed, train.KEY")
        counts = build_variants(run_dir, cfg, out_dir)
        results = {"base": {"rows": 0, **measure(cfg, cfg.model.path, k)}}
        for name in VARIANTS:
            tcfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg.train),
                                   OmegaConf.from_dotlist([f"{a}={b}" for a, b in train_overrides.items()]), {
                                       "model": OmegaConf.to_container(cfg.model), "data": str(out_dir / name),
                                       "objective": "sft", "backend": "local", "run_dir": str(out_dir / name / "train"),
                                       "overwrite": True})
            check_values(tcfg)
            trained = run_training(tcfg)
            results[name] = {"rows": counts[name], **measure(cfg, trained.model_dir, k)}
    except UserError as e:
        print(f"jobs/probe_sft.py: error: {e}", file=sys.stderr)
        return 2
    (out_dir / "probe.json").write_text(json.dumps(results, indent=1))
    print(f"\nSFT on the train prompts, measured on the same prompts ({k} new images each, seed {cfg.seed}), %:")
    print("| data | rows | Gen. | Non. | und. accuracy |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rows']} | {100 * r['gen']:.1f} | {100 * r['non']:.1f} | {100 * r['und']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
