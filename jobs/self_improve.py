"""Self-improvement, the main job: `python jobs/self_improve.py [experiment=NAME] [key=value ...]`.

    python jobs/self_improve.py                                  # the shapes world, C-SFT, embedded Ray
    python jobs/self_improve.py mode=dpo rounds=3 run_dir=runs/dpo3
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/self_improve.py \
        experiment=janus-pro-7b run_dir=/mnt/gapray/runs/janus-pro-7b

Measures the base model on held-out prompts, lets it sample and judge its own images, trains on the
verdicts (SFT/DPO, Ray Train + DeepSpeed), replays the discard pool (c-sft, c-dpo), measures again and
writes the run report; gapray/curriculum.py has the phases. Defaults: conf/self_improve.yaml; presets:
conf/experiment/ (shapes, janus-pro-1b, janus-pro-7b). backend=ray (default) runs the CurriculumDriver as a
named Ray actor (one per run_dir) next to Serve replicas, Ray Data and Ray Train, on the cluster of
RAY_ADDRESS (`ray job submit`) or on an embedded one bound to 127.0.0.1; backend=local runs everything in
this process. Submitting again with the same run_dir resumes after the last completed phase.
User errors (bad config, missing checkpoint, unreadable prompt file, a run_dir holding another run or a damaged
or foreign file: `gapray verify RUN_DIR`): one line, exit code 2, nothing in run_dir touched. The data-quality
gate stopping the run: one line, exit code 3.
"""

import argparse
import os
import sys
from pathlib import Path

# Ray must listen on loopback only here (DESIGN.md); set before anything imports ray.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.errors import UserError  # noqa: E402


def load(argv: list[str]):
    """The run's config, checked as far as possible before anything starts (prompt files, model path,
    an existing run_dir holding another run)."""
    from gapray.config import CONF_DIR, SelfImproveConfig, load_config
    from gapray.models.loading import check_model
    from gapray.curriculum import RunState, check_resumable
    from gapray.data.integrity import check_run_dir_integrity
    from gapray.preflight import check_self_improve
    from gapray.prompts import load_prompts

    parser = argparse.ArgumentParser(prog="jobs/self_improve.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file (default: conf/self_improve.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mode=dpo rounds=2")
    args = parser.parse_args(argv)
    cfg = load_config(SelfImproveConfig, args.config or CONF_DIR / "self_improve.yaml", args.overrides)
    load_prompts(cfg.prompts, limit=cfg.max_prompts)
    load_prompts(cfg.eval_prompts, limit=cfg.max_eval_prompts)
    check_model(cfg.model)
    check_self_improve(cfg, args.overrides, args.config)  # GPUs, dtype, batch, run_dir, hub: gapray/preflight.py
    check_run_dir_integrity(Path(cfg.run_dir).resolve())  # damaged or foreign files: one line, no phase run
    check_resumable(Path(cfg.run_dir).resolve(), cfg)
    RunState.load(Path(cfg.run_dir).resolve())  # a damaged state.json: refused here, not inside the driver
    return cfg


def run(cfg) -> dict:
    from gapray.curriculum import ACTOR_NAMESPACE, CurriculumDriver, driver_name

    if cfg.backend == "local":
        return CurriculumDriver(cfg).run()
    import ray

    from gapray.backends.ray import init_ray

    started = init_ray(cfg, log_to_driver=True)
    try:
        name = driver_name(cfg.run_dir)
        try:  # a named actor: a second driver for the same run_dir is refused while the first lives
            ray.get_actor(name, namespace=ACTOR_NAMESPACE)
            raise UserError(f"run_dir '{cfg.run_dir}' is being run by a live driver ({name}); wait for it or stop it")
        except ValueError:
            pass
        driver = ray.remote(CurriculumDriver).options(name=name, namespace=ACTOR_NAMESPACE, num_cpus=0,
                                                      max_concurrency=2).remote(cfg)  # a DictConfig pickles whole
        return ray.get(driver.run.remote())
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from gapray.curriculum import GateStopped

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load(argv)
        summary = run(cfg)
    except UserError as e:
        print(f"jobs/self_improve.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the gate fires inside the driver actor: Ray wraps it
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, (GateStopped, UserError)):
            print(f"jobs/self_improve.py: {'stopped' if isinstance(cause, GateStopped) else 'error'}: {cause}",
                  file=sys.stderr)
            return 3 if isinstance(cause, GateStopped) else 2
        raise
    from gapray.report import results_table

    print(f"\nbase vs improved ({summary['mode']}, {summary['rounds']} round(s); held-out prompts, %):")
    print(results_table(summary["table"]))
    print(f"\nrun directory: {Path(cfg.run_dir).resolve()} (report.md, summary.json, plots/, grids/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
