"""Images sampled-and-scored per second: Serve + Ray Data vs the single-process path, same machine, one run.

    python bench/pipeline.py                                    # tiny model, 24 shapes-world prompts x 4
    python bench/pipeline.py --prompts 48 --per-prompt 4 --replicas 2 --replica-cpus 1

Both paths draw the same images (same prompts, per-image seeds) and judge them with the same verdict
question, and with the same external judge (the shapes oracle): the single-process path is `gapray measure
backend=local`'s loop (sample_and_score over batches of prompts); the Ray path is `backend=ray`'s (Ray Data
tasks calling the ModelServer replicas' self_judge, which batch requests with @serve.batch: one trip per
image). Each side gets one warm-up call first; the Ray figure is the whole dataset execution, Data task
start-up included, after the app is deployed (deploy time printed apart), and the replica's time in the model
is printed beside it.
Ray runs locally on 127.0.0.1 only. Prints figures; asserts nothing about time.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# Ray listens on loopback only (DESIGN.md); Ray reads this when it is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from gapray.config import CONF_DIR, MeasureConfig, load_config  # noqa: E402
from gapray.judges import build_judge  # noqa: E402
from gapray.selfjudge import sample_and_score  # noqa: E402
from gapray.models import SamplingParams  # noqa: E402
from gapray.models.loading import load_model  # noqa: E402
from gapray.prompts import load_prompts  # noqa: E402

WORLD = Path(__file__).resolve().parent.parent / "gapray/world/data/train.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="preset, save_pretrained directory or hub id")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--batch-prompts", type=int, default=4, help="prompts per batch (local) / per Data batch (Ray)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 1),
                    help="logical CPUs (= torch threads) per replica; the local path uses torch's default")
    ap.add_argument("--max-batch-size", type=int, default=32, help="Serve batch size in model rows")
    ap.add_argument("--concurrency", type=int, default=2, help="Data tasks in flight (data.concurrency)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = load_config(MeasureConfig, CONF_DIR / "measure.yaml", [
        f"model={args.model}", f"images_per_prompt={args.per_prompt}", f"batch_prompts={args.batch_prompts}",
        f"seed={args.seed}", "backend=ray", f"serve.num_replicas={args.replicas}",
        f"serve.num_cpus={args.replica_cpus}", f"serve.max_batch_size={args.max_batch_size}",
        f"data.concurrency={args.concurrency}", "serve.route_prefix=null"])
    prompts = load_prompts(WORLD, limit=args.prompts)
    n_images = len(prompts) * args.per_prompt
    sampling = SamplingParams(**cfg.sampling)

    # ---- single process ----
    model = load_model(cfg.model)
    judge = build_judge(cfg)  # both paths judge with it too (the shapes oracle for these prompts)
    sample_and_score(model, prompts[:1], 1, sampling, args.seed + 1, judge=judge)  # warm-up
    t0 = time.perf_counter()
    local = []
    for i in range(0, len(prompts), args.batch_prompts):
        local += sample_and_score(model, prompts[i:i + args.batch_prompts], args.per_prompt, sampling, args.seed,
                                  cfg.scoring.mode, cfg.scoring.threshold, judge)
    t_local = time.perf_counter() - t0
    threads = torch.get_num_threads()
    del model

    # ---- Serve + Ray Data ----
    import ray
    from ray import serve

    from gapray.backends.ray import init_ray, verdict_dataset
    from gapray.serve.judge import judge_spec
    from gapray.serve.server import deploy, free_port

    cfg.serve.http_port = free_port()
    init_ray(cfg)
    app = "gapray-bench"
    t0 = time.perf_counter()
    handle = deploy(cfg.model, cfg.serve, name=app, route_prefix=None, judge=judge_spec(cfg))
    t_deploy = time.perf_counter() - t0
    p0 = prompts[0]
    handle.self_judge.remote({"prompt_id": p0.prompt_id, "task": p0.task, "prompt": p0.prompt, "meta": p0.meta},
                             [0], args.seed + 1, dict(cfg.sampling)).result()  # warm-up
    t0 = time.perf_counter()
    ray_rows = []
    ds = verdict_dataset([(p, list(range(args.per_prompt))) for p in prompts], cfg, app)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ray_rows += batch.select(["prompt_id", "sample_idx", "image_tokens"]).to_pylist()
    t_ray = time.perf_counter() - t0
    stats = handle.stats.remote().result()  # one replica's view
    serve.delete(app)
    ray.shutdown()

    key = lambda r: (r["prompt_id"], r["sample_idx"])
    same = sum(a["image_tokens"] == b["image_tokens"] for a, b in zip(sorted(local, key=key), sorted(ray_rows, key=key)))
    sample_batches = stats["self_judge"][1:]  # without the warm-up
    print(f"model {args.model}, {n_images} images ({len(prompts)} prompts x {args.per_prompt}), "
          f"{platform.processor() or 'cpu'} x {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}")
    print(f"local: batches of {args.batch_prompts} prompts, {threads} torch threads | ray: {args.replicas} replica(s) x "
          f"{args.replica_cpus:g} CPUs, max_batch_size {args.max_batch_size} rows, {args.concurrency} Data tasks at once, "
          f"deploy {t_deploy:.1f} s (not timed below)")
    print(f"{'path':<34}{'images':>8}{'seconds':>10}{'images/s':>10}")
    print(f"{'single process (backend=local)':<34}{len(local):>8}{t_local:>10.2f}{len(local) / t_local:>10.2f}")
    print(f"{'Serve + Ray Data (backend=ray)':<34}{len(ray_rows):>8}{t_ray:>10.2f}{len(ray_rows) / t_ray:>10.2f}")
    print(f"ratio ray / local: {(len(ray_rows) / t_ray) / (len(local) / t_local):.2f}x; same images: {same} of {len(local)}")
    if sample_batches:
        print(f"Serve self_judge batches (replica {stats['pid']}): {len(sample_batches)}, mean "
              f"{sum(n for n, _ in sample_batches) / len(sample_batches):.1f} requests / "
              f"{sum(r for _, r in sample_batches) / len(sample_batches):.1f} model rows per batch; "
              f"{stats['model_seconds']['self_judge']:.2f} s in the model ({stats['torch_threads']} torch threads)")


if __name__ == "__main__":
    main()
