"""`gapray COMMAND [key=value ...]`: the command-line entry point.

`gapray run | train | reproduce | pretrain-world [args]`: the recipes of jobs/ (jobs/self_improve.py, train.py,
reproduce.py, pretrain_world.py), run by name as torchtune's `tune run` does; each job file stays what
`ray job submit -- python jobs/<job>.py` runs, with the same arguments.

`gapray verify RUN_DIR`: every Parquet file and checkpoint of a run directory checked (gapray.data.integrity).
`gapray plan [--config FILE] [key=value ...]`: the per-GPU memory estimate of a self-improvement config (gapray.plan);
exit code 2 when a role cannot fit its GPU (cluster.gpu_memory_gb, else this machine's).
User errors (bad config, bad prompt file, missing model) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from gapray.errors import UserError

COMMANDS = {"measure": "sample K images per prompt, self-score them, report the non-unification score"}
VERIFY = "check every Parquet file and checkpoint of a run directory; one line per damaged file and its fix"
PLAN = "per-GPU memory estimate of a self-improvement config (jobs/self_improve.py's keys); refuses one that cannot fit"
JOBS = {  # command -> (jobs/<file>.py, what it does)
    "run": ("self_improve", "a self-improvement run: sample, self-judge, gate, train, replay, measure (the main job)"),
    "train": ("train", "SFT or DPO on a preference directory (Ray Train + DeepSpeed, or one process)"),
    "reproduce": ("reproduce", "the paper's table and claims on the shapes world, over seeds"),
    "pretrain-world": ("pretrain_world", "train the shapes-world Janus (VQ tokenizer, then the language model)"),
}
JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOBS:  # everything after the name is the job's own (its --help too)
        return run_job(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="gapray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help="YAML file (default: conf/<command>.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. images_per_prompt=8")
    p = sub.add_parser("verify", help=VERIFY, description=VERIFY + " (exit code 2 if any)")
    p.add_argument("run_dir", help="a run directory (jobs/self_improve.py, gapray measure)")
    p = sub.add_parser("plan", help=PLAN, description=PLAN + " (exit code 2)")
    p.add_argument("--config", default=None, help="YAML file (default: conf/self_improve.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. experiment=janus-pro-7b cluster.gpu_memory_gb=24")
    for name, (_, help_text) in JOBS.items():  # listed in --help; main() hands them their arguments above
        sub.add_parser(name, help=f"{help_text} (jobs/{JOBS[name][0]}.py; `gapray {name} --help`)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            return verify(args.run_dir)
        if args.command == "plan":
            return plan(args.config, args.overrides)
        return run(args.command, args.config, args.overrides)
    except UserError as e:
        print(f"gapray {args.command}: error: {e}", file=sys.stderr)
        return 2


def run(command: str, config: str | None, overrides: list[str]) -> int:
    from gapray.config import CONF_DIR, MeasureConfig, load_config

    if command == "measure":
        from gapray.measure import run_measure

        cfg = load_config(MeasureConfig, config or CONF_DIR / "measure.yaml", overrides)
        summary = run_measure(cfg)
        print(format_summary(summary))
        print(f"outputs in {cfg.run_dir}/: verdicts.parquet, summary.json, grids/")
    return 0


def plan(config: str | None, overrides: list[str]) -> int:
    """The table on stdout; a role that cannot fit: one line (UserError, exit code 2) after it."""
    from gapray.config import CONF_DIR, SelfImproveConfig, load_config
    from gapray.plan import format_plan, plan_self_improve

    cfg = load_config(SelfImproveConfig, config or CONF_DIR / "self_improve.yaml", overrides)
    estimate = plan_self_improve(cfg)
    print(format_plan(estimate), flush=True)
    refusal = estimate.refusal()
    if refusal:
        raise UserError(refusal)
    return 0


def run_job(command: str, argv: list[str]) -> int:
    """jobs/<file>.py's main(argv), loaded from the checkout gapray runs from (an editable install: `make install`)."""
    path = JOBS_DIR / f"{JOBS[command][0]}.py"
    if not path.is_file():
        print(f"gapray {command}: error: {path} not found: the jobs/ folder of a gapray checkout is needed "
              f"(install it editable: `make install` or `pip install -e .`)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"gapray_job_{JOBS[command][0]}", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main(argv)


def verify(run_dir: str) -> int:
    """The report jobs/self_improve.py gives before it resumes a run: intact (0), or one line per problem (2)."""
    from pathlib import Path

    from gapray.data.integrity import format_report, verify_run_dir

    path = Path(run_dir).resolve()
    if not path.is_dir():
        raise UserError(f"run_dir '{run_dir}' not found")
    problems, kinds = verify_run_dir(path)
    if not problems and not kinds:
        raise UserError(f"run_dir '{run_dir}' holds no file gapray writes; is it a run directory?")
    print("\n".join(format_report(path, problems, kinds)))
    return 2 if any(p.fatal for p in problems) else 0


def format_summary(summary: dict) -> str:
    lines = [f"{'task':<16}{'images':>8}{'rejected':>10}{'non-unif.':>11}  95% CI"]
    for task, s in [*summary["per_task"].items(), ("overall", summary["overall"])]:
        lo, hi = s["ci95"]
        lines.append(f"{task:<16}{s['n']:>8}{s['k']:>10}{(s['value'] or 0):>11.3f}  [{lo:.3f}, {hi:.3f}]"
                     + (f"  ({s['unparsed']} unparsed)" if s.get("unparsed") else ""))
    if "oracle" in summary:  # an external judge (the shapes oracle, a VLM): its figures too
        o, pct = summary["oracle"], lambda v: "-" if v is None else f"{100 * v:.1f}%"
        f = {k: pct(v["value"]) for k, v in o["overall"].items()}
        lines.append(f"{summary.get('judge_model') or 'oracle'}: Gen. {f['generation_accuracy']} of images, GenEval score "
                     f"{pct(o['geneval_score']['value'])} (mean of {o['geneval_score']['n_tasks']} tasks), "
                     f"understanding {f['understanding_accuracy']}, weak-generation {f['weak_generation_rate']}, "
                     f"false acceptance {f['false_acceptance_rate']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
