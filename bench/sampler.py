"""Our CFG sampler (eager step, compiled step) vs transformers' generate(generation_mode="image"), side by side.

    python bench/sampler.py                                            # tiny + shapes, batch 8 and 64, CPU
    python bench/sampler.py --models tiny shapes --batch-sizes 8 64 256
    python bench/sampler.py --models janus-pro-1b-random --batch-sizes 1 --prompts 1 --repeats 1 \
        --n-tokens 16                                                  # CPU: a speed probe, not a full image
    python bench/sampler.py --models janus-pro-1b-random --dtype bfloat16 --batch-sizes 8 64 256   # GPU

Per model and batch size (images per call = --prompts distinct prompts x batch/prompts images each), the
three samplers draw the same number of images from the same prompts with the same CFG weight and
temperature: one untimed first call each (printed: for the compiled step it includes inductor's compile,
or its on-disk cache), then --repeats timed calls. The compiled step is torch.compile'd, default mode on a
CPU, "reduce-overhead" (CUDA graphs) on a GPU (gapray.models.sampler.compile_mode).

Models: tiny (random, 32 px, 64 tokens), shapes (the shipped gapray/assets/shapes-janus), and
janus-pro-1b-random: the real Janus-Pro-1B generation path (24 x 2048 LLM, 576 tokens, 16,384-code head)
built from config with random weights, speed only, no download. --n-tokens N decodes only the first N
image tokens (every sampler; a speed probe for big models on a CPU: tokens/s stays meaningful).

Roofline: one decode step must read the weights it runs (language model + generation head + generation
embedding/aligner) once and the KV cache of every row (2 x batch rows with CFG) up to the current length;
time/step >= (weight bytes + KV bytes at the mean context length) / memory bandwidth. Printed as the
images/s and tokens/s that bound allows at each batch. The bandwidth is --bandwidth-gbs; by default, on a
GPU, the vendor's spec-sheet figure for the card (table SPEC_BANDWIDTH_GBS below, NVIDIA data sheets), on a
CPU a measured one: the best of a few 256 MiB tensor copies with torch (read + write bytes / time), a
STREAM-copy-like figure for the threads this process uses.
Prints figures; asserts nothing about time.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.models import JanusModel, SamplingParams  # noqa: E402
from gapray.models.builders import build_janus_pro_1b_random, build_tiny_janus  # noqa: E402
from gapray.models.sampler import bucket_rows  # noqa: E402

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle",
           "a photo of a yellow cross", "a photo of three purple circles", "a photo of a square above a circle",
           "a photo of a white triangle and a red square", "a photo of four crosses"]
SHAPES_DIR = Path(__file__).resolve().parent.parent / "gapray" / "assets" / "shapes-janus"
# GB/s, HBM/GDDR peak from NVIDIA's data sheets (first match on torch.cuda.get_device_name() wins)
SPEC_BANDWIDTH_GBS = [("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("A100-SXM4-80GB", 2039),
                      ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300), ("A10G", 600),
                      ("A10", 600), ("T4", 320), ("V100", 900)]


def load(name: str, device: str, dtype: torch.dtype) -> JanusModel:
    if name == "shapes":
        jm = JanusModel.from_pretrained(str(SHAPES_DIR), device=device)
    else:
        model, processor = (build_tiny_janus if name == "tiny" else build_janus_pro_1b_random)()
        jm = JanusModel(model.to(device), processor)
    jm.model.to(dtype=dtype)
    return jm


def measured_bandwidth_gbs(device: str) -> float:
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device)  # 256 MiB
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * x.element_size() / best / 1e9


def bandwidth(args) -> tuple[float, str]:
    if args.bandwidth_gbs:
        return args.bandwidth_gbs, "--bandwidth-gbs"
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, gbs in SPEC_BANDWIDTH_GBS:
            if key in name:
                return gbs, f"spec sheet, {key}"
    return measured_bandwidth_gbs(args.device), "measured: torch copy of 256 MiB, best of 5"


def step_bytes(jm: JanusModel, rows: int, prompt_len: int, n_tokens: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step reads, KV at the mean context length over the image."""
    m = jm.model.model
    mods = [m.language_model, m.generation_head, m.generation_embeddings, m.generation_aligner]
    weights = sum(p.numel() * p.element_size() for mod in mods for p in mod.parameters())
    # the embedding table is gathered, not read whole: count one row per token instead of the table
    emb = m.generation_embeddings.weight
    weights -= emb.numel() * emb.element_size() - rows * emb.shape[1] * emb.element_size()
    cfg = m.language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * jm.model.dtype.itemsize
    return weights, rows * kv_per_token * (prompt_len + n_tokens / 2)


def timed(fn, repeats: int, sync) -> tuple[float, float]:
    """(first call s, mean s of `repeats` further calls)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return first, (time.perf_counter() - t0) / max(repeats, 1)


def bench_model(name: str, args, bw_gbs: float, sync) -> None:
    jm = load(name, args.device, getattr(torch, args.dtype))
    model = jm.model
    vision = model.model.vision_model.config
    if args.n_tokens:  # transformers' loop reads this too (speed probe: the ids no longer decode to an image)
        vision.num_image_tokens = jm.n_image_tokens = min(args.n_tokens, jm.n_image_tokens)
    n_tok = jm.n_image_tokens
    params_m = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    print(f"\n## {name}: LLM {params_m:.2f}M params, {n_tok} tokens/image, {args.dtype}, CFG {args.guidance_scale}, "
          f"T {args.temperature}, {args.repeats} timed call(s) after one first call")
    head = (f"{'batch':>6} {'sampler':<22}{'first s':>9}{'s/call':>9}{'images/s':>10}{'tokens/s':>10}"
            f"{'vs hf':>7}{'roofline img/s':>16}{'% roof':>8}")
    print(head)
    params = SamplingParams(guidance_scale=args.guidance_scale, temperature=args.temperature)
    for batch in args.batch_sizes:
        n_prompts = min(args.prompts, batch)
        if batch % n_prompts:
            print(f"{batch:>6} skipped: not a multiple of --prompts {n_prompts}")
            continue
        per_prompt = batch // n_prompts
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)]
        enc = jm.generation_inputs(prompts)

        def ours():
            return jm.sample(prompts, per_prompt, params, seeds=0)

        def transformers_generate():
            with torch.no_grad():
                return model.generate(**enc, generation_mode="image", do_sample=args.temperature > 0,
                                      guidance_scale=args.guidance_scale, temperature=args.temperature or None,
                                      num_return_sequences=per_prompt)

        results = []
        try:
            for label, fn, compile in [("gapray eager", ours, False), ("gapray compiled", ours, True),
                                       ("transformers generate", transformers_generate, False)]:
                jm.compile = compile
                results.append((label, *timed(fn, args.repeats, sync)))
        except torch.OutOfMemoryError:
            print(f"{batch:>6} out of memory")
            jm.compile = False
            continue
        jm.compile = False
        t_hf = results[-1][2]
        rows = 2 * batch if params.guided else batch
        w, kv = step_bytes(jm, rows, enc["input_ids"].shape[1], n_tok)
        roof_step = (w + kv) / (bw_gbs * 1e9)
        roof_img_s = batch / (n_tok * roof_step)
        for label, first, t in results:
            print(f"{batch:>6} {label:<22}{first:>9.2f}{t:>9.3f}{batch / t:>10.2f}{batch * n_tok / t:>10.0f}"
                  f"{t_hf / t:>6.2f}x{roof_img_s:>16.1f}{100 * batch / t / roof_img_s:>7.1f}%")
        print(f"{'':>6} roofline: {w / 1e6:.1f} MB weights + {kv / 1e6:.1f} MB KV per step at {bw_gbs:.0f} GB/s = "
              f"{roof_step * 1e3:.3f} ms/step ({rows} rows; compiled step runs {bucket_rows(batch)} images)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=["tiny", "shapes", "janus-pro-1b-random"],
                    default=["tiny", "shapes"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 64], help="images per call")
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts per call (batch = prompts x per-prompt)")
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-tokens", type=int, default=None, help="decode only the first N image tokens (speed probe)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="memory bandwidth for the roofline (default: spec sheet on a GPU, measured on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    bw, bw_source = bandwidth(args)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device {dev}, torch {torch.__version__}; memory bandwidth {bw:.1f} GB/s ({bw_source})")
    for name in args.models:
        bench_model(name, args, bw, sync)


if __name__ == "__main__":
    main()
