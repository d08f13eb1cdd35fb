"""Post-train on preference data: `python jobs/train.py data=<preference dir> [key=value ...]`.

    python jobs/train.py data=runs/r0/data/round=0 objective=dpo deepspeed.zero_stage=3 scaling.num_workers=4 \
        scaling.use_gpu=true model=janus-pro-1b run_dir=runs/r0/train
    ray job submit --working-dir . -- python jobs/train.py data=... run_dir=/shared/runs/r0/train

Defaults in conf/train.yaml (`--config` for another file); keys in gapray/config.py (TrainConfig). Running
the same run_dir again resumes from its latest checkpoint. The trained model lands in run_dir/model as a
save_pretrained directory (`gapray measure model=<run_dir>/model`). User errors: one line, exit code 2.
"""

import argparse
import os
import sys
from pathlib import Path

# Ray must listen on loopback only here (DESIGN.md); set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file (default: conf/train.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data=<dir> deepspeed.zero_stage=3")
    args = parser.parse_args(argv)
    try:
        from gapray.config import CONF_DIR, TrainConfig, load_config
        from gapray.train import run_training

        cfg = load_config(TrainConfig, args.config or CONF_DIR / "train.yaml", args.overrides)
        started = False
        if cfg.backend == "ray":
            from gapray.backends.ray import init_ray
            started = init_ray(cfg)
        try:
            result = run_training(cfg)
        finally:
            if started:
                import ray
                ray.shutdown()
    except UserError as e:
        print(f"jobs/train.py: error: {e}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"trained {result.steps} steps; last logged: {shown}")
    print(f"model: {result.model_dir}" + (f"\nlatest checkpoint: {result.checkpoint}" if result.checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
