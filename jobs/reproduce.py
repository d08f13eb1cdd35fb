"""Reproduce the paper's findings on the shapes world: `python jobs/reproduce.py [key=value ...] [run.KEY=VALUE ...]`.

    python jobs/reproduce.py                                   # 3 seeds, the full setting (README: time)
    python jobs/reproduce.py seeds=[0,1] rounds=2 run.max_prompts=24 run.train.micro_batch_size=2   # reduced

What it runs, per seed s (each a self-improvement run, gapray/curriculum.py, in out_dir/seed=s/<name>/):
  sft, dpo, c-dpo     one round each (PAPER.md, Algorithms 1 and 2);
  c-sft               `rounds` rounds: the table reads round 1, the rounds plot all of them (where the closed
                      loop converges);
  corrupt             c-sft with a corrupted judge (corrupt_judge: verdicts flipped or noised at a rate): the
                      co-degradation check, and whether the data-quality gate fires;
every run with gate.on_fail=warn: the gate's audit is recorded (and reported per run and round), not obeyed;
and on each seed's sft run (which exports a model after every epoch) the learning-dynamics diagnostic
(gapray/diagnostics.py): gradient inner products between generation on training samples and understanding on
held-out samples, next to the measured understanding accuracy at the same checkpoint.
Every run's settings: conf/self_improve.yaml with `run:` of conf/reproduce.yaml and the command line's
run.KEY=VALUE applied (default: one process, backend=local, train.backend=local; all measures on the held-out
eval split, which is never trained or tuned on). "base" is each run's measure/0 (the same images for one seed).

Writes out_dir/results.json (every figure), out_dir/results.md (the paper's table as mean +- std over seeds,
data counts, claims (a)-(f) each with its numbers and whether it held, the issue's targets, the diagnostic) and
out_dir/plots/. Running it again skips finished runs (each resumes from its state.json) and recomputes the rest.
Assumes the shapes world (the oracle is the external judge); a user error is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.errors import UserError  # noqa: E402



# ---- configuration -------------------------------------------------------------------------------------------
def load(argv: list[str]):
    """-> (ReproduceConfig, the shared self-improvement config). Both checked before anything runs."""
    from gapray.config import CONF_DIR, ReproduceConfig, SelfImproveConfig, load_config
    from gapray.prompts import load_prompts

    parser = argparse.ArgumentParser(prog="jobs/reproduce.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file (default: conf/reproduce.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value (seeds=[0,1,2], rounds=3) or run.KEY=VALUE")
    args = parser.parse_args(argv)
    own = [o for o in args.overrides if not o.startswith("run.")]
    cfg = load_config(ReproduceConfig, args.config or CONF_DIR / "reproduce.yaml", own)
    run_overrides = list(cfg.run) + [o[len("run."):] for o in args.overrides if o.startswith("run.")]
    try:
        base = load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml", run_overrides)
    except UserError as e:
        raise UserError(f"run: {e}") from None
    if base.gate.judge != "oracle":
        raise UserError("run.gate.judge: the reproduction needs the shapes oracle as its external judge (oracle)")
    load_prompts(base.prompts, limit=base.max_prompts)
    load_prompts(base.eval_prompts, limit=base.max_eval_prompts)
    return cfg, base


def run_configs(cfg, base) -> dict[tuple[int, str], object]:
    """(seed, name) -> that run's self-improvement config."""
    from omegaconf import OmegaConf

    out_dir = Path(cfg.out_dir).resolve()
    runs = {}
    for seed in cfg.seeds:
        for name in [*cfg.modes, "corrupt"]:
            # the gate records and warns instead of stopping: every run is measured, and results say where it fired
            c = OmegaConf.merge(base, {"seed": seed, "run_dir": str(out_dir / f"seed={seed}" / name),
                                       "gate": {"on_fail": "warn"}})
            if name == "c-sft":
                c.rounds = cfg.rounds
            elif name == "sft":  # the diagnostic reads a model after every epoch
                c.train.checkpoint.export_epochs = list(range(1, c.train.epochs))
            if name == "corrupt":
                c.mode, c.corrupt_judge = "c-sft", cfg.corrupt_judge
            else:
                c.mode = name
            runs[(seed, name)] = c
    return runs


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from gapray.curriculum import CurriculumDriver
    from gapray.world.reproduce import aggregate, run_diagnostic, write_plots, write_results

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, base = load(argv)
        out_dir = Path(cfg.out_dir).resolve()
        runs = run_configs(cfg, base)
        summaries, diagnostics = {}, {}
        for (seed, name), run_cfg in runs.items():
            print(f"[reproduce] seed {seed}: {name} -> {run_cfg.run_dir}", flush=True)
            summaries[(seed, name)] = CurriculumDriver(run_cfg).run()
            if name == "sft":
                path = Path(run_cfg.run_dir) / "diagnostic.json"
                if not path.is_file():
                    path.write_text(json.dumps(run_diagnostic(cfg, run_cfg, Path(run_cfg.run_dir)), indent=1))
                diagnostics[str(seed)] = json.loads(path.read_text())
    except UserError as e:
        print(f"jobs/reproduce.py: error: {e}", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    results = aggregate(cfg, summaries, diagnostics)
    results["run"] = OmegaConf.to_container(base, resolve=True)  # the settings every run shared
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_plots(results, out_dir / "plots")
    write_results(cfg, results, out_dir)
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
