"""`gapray COMMAND [key=value ...]`: the command-line entry point.

`gapray verify RUN_DIR`: every Parquet file and checkpoint of a run directory checked (gapray.data.integrity).
User errors (bad config, bad prompt file, missing model) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

from gapray.errors import UserError

COMMANDS = {"measure": "sample K images per prompt, self-score them, report the non-unification score"}
VERIFY = "check every Parquet file and checkpoint of a run directory; one line per damaged file and its fix"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gapray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help="YAML file (default: conf/<command>.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. images_per_prompt=8")
    p = sub.add_parser("verify", help=VERIFY, description=VERIFY + " (exit code 2 if any)")
    p.add_argument("run_dir", help="a run directory (jobs/self_improve.py, gapray measure)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            return verify(args.run_dir)
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
