"""Our CFG sampler vs transformers' generate(generation_mode="image"): images/s, same model and settings.

    python bench/sampler.py --model tiny --prompts 4 --per-prompt 2        # CPU, seconds
    python bench/sampler.py --model janus-pro-1b-random --prompts 1 --per-prompt 2 --repeats 1

Both sides draw the same number of images from the same prompts with the same CFG weight and
temperature, one warm-up call each (skipped with --no-warmup), then `--repeats` timed calls.
janus-pro-1b-random is the real Janus-Pro-1B generation path (24 x 2048 LLM, 576 tokens, 16,384-code
head) built from config with random weights: speed only, no download.
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

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle",
           "a photo of a yellow cross", "a photo of three purple circles", "a photo of a square above a circle",
           "a photo of a white triangle and a red square", "a photo of four crosses"]


def timed(fn, repeats: int, warmup: bool, sync) -> float:
    if warmup:
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "janus-pro-1b-random"], default="tiny")
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts per call")
    ap.add_argument("--per-prompt", type=int, default=2, help="images per prompt (batch = prompts x per-prompt)")
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    build = build_tiny_janus if args.model == "tiny" else build_janus_pro_1b_random
    model, processor = build()
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    jm = JanusModel(model, processor)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    n_images = len(prompts) * args.per_prompt
    params = SamplingParams(guidance_scale=args.guidance_scale, temperature=args.temperature)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def ours():
        return jm.sample(prompts, args.per_prompt, params, seeds=0)

    enc = jm.generation_inputs(prompts)

    def transformers_generate():
        with torch.no_grad():
            return model.generate(**enc, generation_mode="image", do_sample=True, guidance_scale=args.guidance_scale,
                                  temperature=args.temperature, num_return_sequences=args.per_prompt)

    t_ours = timed(ours, args.repeats, not args.no_warmup, sync)
    t_hf = timed(transformers_generate, args.repeats, not args.no_warmup, sync)
    params_m = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
                                                                             f"{torch.get_num_threads()} threads"
    print(f"model {args.model} (LLM {params_m:.0f}M params, {jm.n_image_tokens} tokens/image), {args.dtype}, "
          f"device {dev}, torch {torch.__version__}")
    print(f"batch {n_images} images ({len(prompts)} prompts x {args.per_prompt}), CFG {args.guidance_scale}, "
          f"T {args.temperature}, {args.repeats} timed call(s)")
    print(f"{'sampler':<28}{'s/call':>10}{'images/s':>11}{'tokens/s':>11}")
    for name, t in [("gapray cfg_decode", t_ours), ("transformers generate", t_hf)]:
        print(f"{name:<28}{t:>10.3f}{n_images / t:>11.2f}{n_images * jm.n_image_tokens / t:>11.0f}")
    print(f"speed-up (ours / transformers): {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
