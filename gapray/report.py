"""Pictures for people: image grids with the verdicts drawn on them.

Frame and caption colour: the model's own verdict (green accepted, red rejected, grey unparsed). Where an
external judge exists (the shapes oracle), its verdict is in the caption and the corner square."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

GREEN, RED, GREY = (40, 170, 70), (210, 50, 50), (128, 128, 128)
CELL = 128  # pixels per image in a grid, whatever the model's resolution


def verdict_color(verdict: int | None) -> tuple[int, int, int]:
    return GREY if verdict is None else (GREEN if verdict == 1 else RED)


def image_grid(images: np.ndarray, labels: list[str], colors: list[tuple], ncol: int, title: str = "",
               marks: list[tuple] | None = None) -> Image.Image:
    """Each image upscaled to CELL px with a coloured frame and a caption line under it; `marks`, if given,
    colour a square in each image's top-right corner (a second judge's verdict)."""
    n = len(images)
    nrow = max(1, -(-n // ncol))
    pad, cap, top = 4, 14, 18 if title else 0
    w, h = ncol * (CELL + 2 * pad), top + nrow * (CELL + 2 * pad + cap)
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    for i, (img, label, color) in enumerate(zip(images, labels, colors)):
        x, y = (i % ncol) * (CELL + 2 * pad), top + (i // ncol) * (CELL + 2 * pad + cap)
        draw.rectangle([x, y, x + CELL + 2 * pad - 1, y + CELL + 2 * pad - 1], fill=color)
        grid.paste(Image.fromarray(img).resize((CELL, CELL), Image.NEAREST), (x + pad, y + pad))
        draw.text((x + pad, y + CELL + 2 * pad), label, fill=color)
        if marks is not None:
            draw.rectangle([x + CELL - 10, y + pad, x + CELL + pad - 1, y + pad + 13], fill=marks[i], outline=(255, 255, 255))
    return grid


def write_verdict_grids(model, rows: list[dict], out_dir: Path, prompts_per_task: int) -> list[Path]:
    """One PNG per task: the first `prompts_per_task` prompts, one row of images per prompt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for r in rows:
        prompts = by_task[r["task"]]
        if r["prompt_id"] in prompts or len(prompts) < prompts_per_task:
            prompts.setdefault(r["prompt_id"], []).append(r)
    paths = []
    for task, prompts in sorted(by_task.items()):
        shown = [r for group in prompts.values() for r in group]
        images = model.decode(torch.tensor([r["image_tokens"] for r in shown]))
        labels = [f"self {'?' if r['verdict'] is None else r['verdict']} p={r['p_aligned']:.2f}" for r in shown]
        # with an external judge (the shapes oracle): its verdict in the caption and as a corner mark
        judged = any(r.get("oracle_verdict") is not None for r in shown)
        if judged:
            labels = [f"{lab} | oracle {'-' if r.get('oracle_verdict') is None else r['oracle_verdict']}"
                      for lab, r in zip(labels, shown)]
        ncol = max(len(g) for g in prompts.values())
        title = f"{task}: " + " | ".join(g[0]["prompt"] for g in prompts.values())
        path = out_dir / f"{task}.png"
        marks = [verdict_color(r.get("oracle_verdict")) for r in shown] if judged else None
        image_grid(images, labels, [verdict_color(r["verdict"]) for r in shown], ncol, title[:160], marks).save(path)
        paths.append(path)
    return paths
