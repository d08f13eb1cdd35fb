"""Trainer throughput per ZeRO stage: samples/s and image tokens/s per worker, Ray Train + DeepSpeed.

    python bench/train.py                                    # tiny model, CPU, 2 workers, ZeRO 0 2 3
    python bench/train.py --model janus-pro-1b-random --use-gpu --workers 4 --micro-batch-size 2 --steps 20

Every stage trains the same random preference set (random image tokens; precomputed reference log-probs
unless --reference model) for --steps optimizer steps with the same config; the figures are medians over
the steps after the first (warm-up), measured inside each worker (forward + backward + optimizer step +
data), averaged over workers. A DPO sample is a pair: 2 x T image tokens through the policy (plus the
reference forward with --reference model). janus-pro-1b-random is the real Janus-Pro-1B shape built from
config with random weights (speed only, no download), saved to a temporary directory for the workers.
Prints figures and ratios to ZeRO-0 side by side; asserts nothing about time.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from gapray.backends.ray import init_ray  # noqa: E402
from gapray.config import CONF_DIR, TrainConfig, load_config  # noqa: E402
from gapray.data.schemas import DPO_SCHEMA, SFT_SCHEMA  # noqa: E402
from gapray.train import read_metrics, run_training  # noqa: E402

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle",
           "a photo of a yellow cross", "a photo of three purple circles", "a photo of a square above a circle"]


def model_path(name: str, tmp: Path) -> tuple[str, int, int]:
    """-> (model= value for the workers, image tokens per image, codebook size)."""
    if name == "janus-pro-1b-random":
        from gapray.models import JanusModel
        from gapray.models.builders import build_janus_pro_1b_random

        model, processor = build_janus_pro_1b_random()
        JanusModel(model, processor).save_pretrained(str(tmp / "model"))
        name = str(tmp / "model")
    from gapray.config import ModelConfig
    from gapray.models.loading import load_model
    from omegaconf import OmegaConf

    jm = load_model(OmegaConf.structured(ModelConfig(path=name, device="cpu")))
    return name, jm.n_image_tokens, jm.model.config.vq_config.num_embeddings


def write_data(path: Path, n: int, n_tokens: int, codebook: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    toks = lambda: rng.integers(0, codebook, n_tokens).astype(np.int32).tolist()  # noqa: E731
    dpo = [dict(round=0, prompt_id=f"p{i}", task="bench", prompt=PROMPTS[i % len(PROMPTS)], chosen_tokens=toks(),
                rejected_tokens=toks(), chosen_p=0.9, rejected_p=0.1,
                ref_chosen_logp=float(-n_tokens * np.log(codebook)), ref_rejected_logp=float(-n_tokens * np.log(codebook)))
           for i in range(n)]
    sft = [dict(round=0, prompt_id=f"p{i}", task="bench", prompt=PROMPTS[i % len(PROMPTS)], sample_idx=0,
                image_tokens=toks(), p_aligned=0.9) for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(dpo, schema=DPO_SCHEMA), path / "dpo.parquet")
    pq.write_table(pa.Table.from_pylist(sft, schema=SFT_SCHEMA), path / "sft.parquet")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, janus-pro-1b-random, or a save_pretrained directory")
    ap.add_argument("--objective", choices=["dpo", "sft"], default="dpo")
    ap.add_argument("--reference", choices=["data", "model"], default="data")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--offload-optimizer", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gapray_bench_train_"))
    model, n_tokens, codebook = model_path(args.model, tmp)
    write_data(tmp / "data", args.steps * args.workers * args.micro_batch_size, n_tokens, codebook)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'GPU' if args.use_gpu else 'CPU'}; model {args.model} ({n_tokens} image tokens); {args.objective}, "
          f"reference={args.reference}; {args.workers} workers x micro-batch {args.micro_batch_size}; "
          f"medians of steps 2..{args.steps}")
    results = {}
    for stage in args.stages:
        run_dir = tmp / f"zero{stage}"
        cfg = load_config(TrainConfig, CONF_DIR / "train.yaml", [
            f"data={tmp / 'data'}", f"model={model}", f"run_dir={run_dir}", f"objective={args.objective}",
            f"loss.reference={args.reference}", f"deepspeed.zero_stage={stage}", f"scaling.num_workers={args.workers}",
            f"scaling.use_gpu={str(args.use_gpu).lower()}", f"micro_batch_size={args.micro_batch_size}",
            f"deepspeed.offload_optimizer={str(args.offload_optimizer and stage > 0).lower()}", "epochs=1"])
        init_ray(cfg)  # the first stage starts it (a no-op afterwards)
        run_training(cfg)
        rows = read_metrics(str(run_dir))[1:]
        results[stage] = {k: statistics.median(r[k] for r in rows)
                          for k in ("perf/samples_per_s", "perf/image_tokens_per_s", "perf/step_time_s")}
    base = results[args.stages[0]]
    print(f"{'ZeRO':>4} {'samples/s/worker':>17} {'image tokens/s/worker':>22} {'step time (s)':>14} "
          f"{'vs ZeRO-' + str(args.stages[0]):>10}")
    for stage, r in results.items():
        print(f"{stage:>4} {r['perf/samples_per_s']:>17.2f} {r['perf/image_tokens_per_s']:>22.0f} "
              f"{r['perf/step_time_s']:>14.3f} {r['perf/samples_per_s'] / base['perf/samples_per_s']:>9.2f}x")


if __name__ == "__main__":
    main()
