"""Pictures for people: image grids with the verdicts drawn on them.

Frame and caption colour: the model's own verdict (green accepted, red rejected, grey unparsed). Where an
external judge gave a verdict (the shapes oracle, or a VLM judge), it is in the caption and the corner square."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

GREEN, RED, GREY = (40, 170, 70), (210, 50, 50), (128, 128, 128)
CELL = 128  # pixels per image in a grid, whatever the model's resolution
WORD_GAP = 4  # pixels between words: PIL's default font draws a space 2 px wide ("a photoofa circle")


def verdict_color(verdict: int | None) -> tuple[int, int, int]:
    return GREY if verdict is None else (GREEN if verdict == 1 else RED)


def draw_words(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill) -> int:
    """`text` drawn word by word, WORD_GAP px apart; returns the x where it ends."""
    x, y = xy
    for i, word in enumerate(text.split(" ")):
        if i:
            x += WORD_GAP
        draw.text((x, y), word, fill=fill)
        x += int(draw.textlength(word))
    return x


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
        draw_words(draw, (4, 3), title, fill=(0, 0, 0))
    for i, (img, label, color) in enumerate(zip(images, labels, colors)):
        x, y = (i % ncol) * (CELL + 2 * pad), top + (i // ncol) * (CELL + 2 * pad + cap)
        draw.rectangle([x, y, x + CELL + 2 * pad - 1, y + CELL + 2 * pad - 1], fill=color)
        grid.paste(Image.fromarray(img).resize((CELL, CELL), Image.NEAREST), (x + pad, y + pad))
        draw_words(draw, (x + pad, y + CELL + 2 * pad), label, fill=color)
        if marks is not None:
            draw.rectangle([x + CELL - 10, y + pad, x + CELL + pad - 1, y + pad + 13], fill=marks[i], outline=(255, 255, 255))
    return grid


def write_verdict_grids(decode, rows: list[dict], out_dir: Path, prompts_per_task: int, prefix: str = "") -> list[Path]:
    """One PNG per task (`<prefix><task>.png`): the first `prompts_per_task` prompts, one row of images per
    prompt. `decode(tokens)` gives the pixels (a model's decode, or a Serve replica's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for r in rows:
        prompts = by_task[r["task"]]
        if r["prompt_id"] in prompts or len(prompts) < prompts_per_task:
            prompts.setdefault(r["prompt_id"], []).append(r)
    paths = []
    for task, prompts in sorted(by_task.items()):
        shown = [r for group in prompts.values() for r in group]
        images = decode(torch.tensor([r["image_tokens"] for r in shown]))
        labels = [f"self {'?' if r['verdict'] is None else r['verdict']} p={r['p_aligned']:.2f}" for r in shown]
        # with an external judge (the oracle, a VLM): its verdict in the caption and as a corner mark
        judged = any(r.get("oracle_verdict") is not None for r in shown)
        if judged:
            labels = [f"{lab} | {'oracle' if r.get('judge_model') in (None, 'oracle') else 'judge'} "
                      f"{'-' if r.get('oracle_verdict') is None else r['oracle_verdict']}"
                      for lab, r in zip(labels, shown)]
        ncol = max(len(g) for g in prompts.values())
        title = f"{task}: " + " | ".join(g[0]["prompt"] for g in prompts.values())
        path = out_dir / f"{prefix}{task}.png"
        marks = [verdict_color(r.get("oracle_verdict")) for r in shown] if judged else None
        image_grid(images, labels, [verdict_color(r["verdict"]) for r in shown], ncol, title[:160], marks).save(path)
        paths.append(path)
    return paths


# ---- the self-improvement run report (gapray/curriculum.py) ---------------------------------------------------
def _value(figure: dict | None) -> float | None:
    return None if figure is None else figure.get("value")


def _pick(block: dict | None, task: str) -> dict | None:
    """A by_task block's entry for one task or "overall" (None when the block or the task is absent)."""
    if block is None:
        return None
    return block["overall"] if task == "overall" else block["per_task"].get(task)


def results_rows(base: dict, final: dict) -> list[dict]:
    """Per task and overall: Gen. (the external judge's generation accuracy), Non. (non-unification), before and
    after, and
    the final model's understanding win rate over the base model (with its count), and the weak-generation and
    false-acceptance rates (the judge rejects what the model rejected / accepted), before and after."""
    out = []
    for t in sorted(base["per_task"]) + ["overall"]:
        judged = [_pick(s.get("oracle"), t) or {} for s in (base, final)]
        win = _pick(final.get("win_rate"), t)
        out.append({"task": t, "gen_base": _value(judged[0].get("generation_accuracy")),
                    "gen_final": _value(judged[1].get("generation_accuracy")),
                    "non_base": _pick(base, t)["value"], "non_final": _pick(final, t)["value"],
                    "win_rate": _value(win), "win_n": None if win is None else win["n"],
                    "weak_base": _value(judged[0].get("weak_generation_rate")),
                    "weak_final": _value(judged[1].get("weak_generation_rate")),
                    "false_accept_base": _value(judged[0].get("false_acceptance_rate")),
                    "false_accept_final": _value(judged[1].get("false_acceptance_rate"))})
    return out


def results_table(rows: list[dict]) -> str:
    """The base-vs-improved table as Markdown (also what the job prints)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"
    lines = ["| task | Gen. base | Gen. final | Und. win rate (n) | Non. base | Non. final | Weak gen. base | "
             "Weak gen. final | False acc. base | False acc. final |", "|---|" + "---:|" * 9]
    for r in rows:
        win = "-" if r["win_n"] is None else f"{pct(r['win_rate'])} ({r['win_n']})"
        lines.append(f"| {r['task']} | {pct(r['gen_base'])} | {pct(r['gen_final'])} | {win} | "
                     f"{pct(r['non_base'])} | {pct(r['non_final'])} | {pct(r.get('weak_base'))} | "
                     f"{pct(r.get('weak_final'))} | {pct(r.get('false_accept_base'))} | "
                     f"{pct(r.get('false_accept_final'))} |")
    return "\n".join(lines)


def judge_label(evals: dict) -> str:
    """The external judge the measures' figures come from: "shapes oracle", a VLM's id, or "none"."""
    names = sorted({s["judge_model"] for s in evals.values() if s.get("judge_model")})
    return ", ".join("shapes oracle" if n == "oracle" else n for n in names) or "none"


def plot_history(evals: dict, train_logs: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """plots/measures.png (Gen. and Non. at every measure) and plots/train_loss.png (every training phase)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    xs = sorted(int(i) for i in evals)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [100 * evals[str(i)]["non_unification"] for i in xs], "o-", label="Non. (self-rejected %)")
    gen = [_value(evals[str(i)].get("oracle", {}).get("overall", {}).get("generation_accuracy")) for i in xs]
    if all(g is not None for g in gen):
        ax.plot(xs, [100 * g for g in gen], "s-", label=f"Gen. ({judge_label(evals)}-accepted %)"[:60])
    ax.set_xlabel("measure (0 = base, i = after round i)")
    ax.set_xticks(xs)
    ax.set_ylabel("%")
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "measures.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if train_logs:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        offset = 0
        for name, log in train_logs.items():
            steps = [offset + m["step"] for m in log]
            ax.plot(steps, [m["loss"] for m in log], label=name)
            offset = steps[-1] if steps else offset
        ax.set_xlabel("optimizer step (phases in order)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "train_loss.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def composition_lines(base: dict, final: dict) -> list[str]:
    """The composition stress test's base vs final line, when the run measured one (composition_prompts)."""
    if "composition" not in base:
        return []
    def fig(s):
        gen = _value(s.get("oracle", {}).get("overall", {}).get("generation_accuracy"))
        return f"Gen. {'-' if gen is None else f'{100 * gen:.1f}'}, Non. {100 * s['non_unification']:.1f}"
    return ["## Composition split (held-out bindings, reported apart)", "",
            f"base: {fig(base['composition'])}; final: {fig(final['composition'])} (%).", ""]


def write_run_report(run_dir: Path, cfg, state, decode, eval_rows: dict[str, list[dict]]) -> dict:
    """summary.json, report.md, plots/*.png and grids/{base,final}_<task>.png of a finished run."""
    import json

    from gapray.rundir import RunDir

    from gapray.config import judge_kind
    from gapray.train.loop import read_metrics

    paths = RunDir(run_dir)
    first, last = "0", str(cfg.rounds)
    kind = judge_kind(cfg)
    base, final = state.evals[first], state.evals[last]
    rows = results_rows(base, final)
    summary = {"mode": cfg.mode, "rounds": cfg.rounds, "model": cfg.model.path, "seed": cfg.seed,
               "prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts, "table": rows, "base": base, "final": final,
               "judge": {"kind": kind, "model": cfg.judge.model if kind == "vlm" else kind},
               "evals": state.evals, "rounds_data": state.rounds, "policy_version": state.policy_version,
               "seconds": state.seconds}
    train_logs = {}
    for r in range(cfg.rounds):
        for part in ("a", "b"):
            d = paths.train(r, part)
            if (d / "metrics.jsonl").is_file():
                train_logs[f"round {r} {part}"] = [m for m in read_metrics(str(d)) if "loss" in m]
    plots = plot_history(state.evals, train_logs, paths.plots)
    grids = write_verdict_grids(decode, eval_rows[first], paths.grids, cfg.grid_prompts, prefix="base_")
    grids += write_verdict_grids(decode, eval_rows[last], paths.grids, cfg.grid_prompts, prefix="final_")

    lines = [f"# gapray self-improvement run: {run_dir.name}", "",
             f"mode **{cfg.mode}**, {cfg.rounds} round(s), model `{cfg.model.path}`, seed {cfg.seed}; "
             f"{cfg.images_per_prompt} candidates per training prompt ({cfg.prompts}), "
             f"{cfg.eval_images_per_prompt} images per held-out prompt ({cfg.eval_prompts}).", "",
             "## Base vs improved (held-out prompts, %)", "", results_table(rows), "",
             f"Gen.: share of generations the external judge ({judge_label(state.evals)}) accepts. Non.: share the "
             "model itself rejects. Und. win rate: on the base model's images, where base and final verdicts differ, the share "
             "where the final verdict agrees with the judge (n = images that differ). Weak gen.: share of the "
             "images the model rejects that the judge rejects too. False acc.: share of the images the model accepts "
             "that the judge rejects.", "",
             *composition_lines(base, final),
             "## Rounds", "", "| round | SFT rows | DPO pairs | discarded | gate precision | replay admitted |",
             "|---|---:|---:|---:|---:|---:|"]
    for r, info in sorted(state.rounds.items(), key=lambda kv: int(kv[0])):
        g = info.get("gate", {})
        prec = "-" if g.get("precision") is None else f"{g['precision']:.2f} ({g['right']}/{g['audited']})"
        prec += " fired" if g.get("fired") else ""
        rep = info.get("replay")
        admitted = "-" if rep is None else f"{rep['admitted']} of {rep['pool']}"
        lines.append(f"| {r} | {info['sample']['sft']} | {info['sample']['dpo']} | {info['sample']['discard']} | "
                     f"{prec} | {admitted} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", f"## Image grids (frame: own verdict; corner: the external judge, {judge_label(state.evals)})", ""] + [f"![{p.stem}](grids/{p.name})" for p in grids]
    lines += ["", "## Time per phase (s)", "", ", ".join(f"{k} {v}" for k, v in state.seconds.items()), ""]
    paths.report.write_text("\n".join(lines))
    paths.summary.write_text(json.dumps(summary, indent=1))
    return summary
