"""The paper's findings on the shapes world, from the summaries of jobs/reproduce.py's runs: the table (mean +- std
over seeds), data counts, claims (a)-(f), the issue's targets, the learning-dynamics diagnostic, results.md and plots.
Plain functions over summary dicts (gapray/curriculum.py's summary.json), except `run_diagnostic`, which loads a
run's exported models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gapray.world.grammar import TASKS

METHODS = ("base", "sft", "c-sft", "dpo", "c-dpo")


# ---- figures -------------------------------------------------------------------------------------------------
def _v(fig) -> float | None:
    return None if fig is None else fig.get("value")


def _at(block: dict | None, task: str):
    if block is None:
        return None
    return block["overall"] if task == "overall" else block["per_task"].get(task)


def measure_figures(ev: dict, task: str) -> dict:
    """Gen., Non., understanding accuracy, weak-generation rate and (after training) the win rate of one measure."""
    oracle = _at(ev.get("oracle"), task) or {}
    win = _at(ev.get("win_rate"), task)
    return {"gen": _v(oracle.get("generation_accuracy")), "non": _v(_at(ev, task)),
            "und_acc": _v(oracle.get("understanding_accuracy")), "weak": _v(oracle.get("weak_generation_rate")),
            "win": _v(win), "win_n": None if win is None else win["n"],
            "win_k": None if win is None else win["k"],
            "fixed_fa": None if win is None else win["fixed_false_accepts"]}


def method_summary(summaries: dict, method: str, seed: int, measure: str = "1", split: str = "eval") -> dict | None:
    """One method's figures on one seed: base = measure/0 of the seed's first run (every run's measure/0 is the
    same images, judged by the same model). split="composition": the stress test measured beside eval."""
    if method == "base":
        name, i = next((n for s_, n in summaries if s_ == seed), None), "0"
    else:
        name, i = method, measure
    s = summaries.get((seed, name))
    if s is None or i not in s["evals"]:
        return None
    ev = s["evals"][i] if split == "eval" else s["evals"][i].get(split)
    return None if ev is None else {t: measure_figures(ev, t) for t in (*TASKS, "overall")}


def mean_std(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def data_counts(s: dict) -> dict:
    r0 = s["rounds_data"]["0"]
    rep = r0.get("replay")
    return {"sft": r0["sample"]["sft"], "dpo": r0["sample"]["dpo"], "discard": r0["sample"]["discard"],
            "replay_admitted": None if rep is None else rep["admitted"],
            "replay_added": None if rep is None else (rep["sft"] if s["mode"].endswith("sft") else rep["dpo"]),
            "gate_precision": r0["gate"].get("precision"), "gate_fired": r0["gate"].get("fired")}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for u in np.unique(v):  # ties share their mean rank
            r[v == u] = r[v == u].mean()
        return r
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def aggregate(cfg, summaries: dict, diagnostics: dict) -> dict:
    """Everything results.md shows, from the runs' summary.json files (and the diagnostic), as plain numbers."""
    seeds = list(cfg.seeds)
    methods = [m for m in METHODS if m == "base" or m in cfg.modes]
    per = {(m, s): method_summary(summaries, m, s) for m in methods for s in seeds}
    table = {m: {t: {k: mean_std([(per[(m, s)] or {}).get(t, {}).get(k) for s in seeds])
                     for k in ("gen", "non", "und_acc", "weak", "win")}
                 for t in (*TASKS, "overall")} for m in methods}
    for m in methods:  # the win rate's denominators, summed over seeds
        for t in (*TASKS, "overall"):
            table[m][t]["win_n"] = sum((per[(m, s)] or {}).get(t, {}).get("win_n") or 0 for s in seeds)
    counts = {name: {k: mean_std([data_counts(summaries[(s, name)])[k] for s in seeds if (s, name) in summaries])
                     for k in ("sft", "dpo", "discard", "replay_admitted", "replay_added", "gate_precision")}
              for name in [*cfg.modes, "corrupt"]}

    def delta(m, key, t="overall", relative=False, measure="1"):
        out = []
        for s in seeds:
            b, a = method_summary(summaries, "base", s), method_summary(summaries, m, s, measure)
            if b is None or a is None or b[t][key] is None or a[t][key] is None:
                continue
            out.append((a[t][key] - b[t][key]) / b[t][key] if relative and b[t][key] else a[t][key] - b[t][key])
        return mean_std(out)

    claims = {}
    base_weak = table["base"]["overall"]["weak"]
    claims["a"] = {"weak_generation_rate": base_weak, "per_task": {t: table["base"][t]["weak"] for t in TASKS},
                   "holds": base_weak["mean"] is not None and base_weak["mean"] > 0.5}
    claims["b"] = {m: {"gen_delta": delta(m, "gen"), "non_delta": delta(m, "non"),
                       "non_relative": delta(m, "non", relative=True)} for m in cfg.modes}
    for m in cfg.modes:
        b = claims["b"][m]
        b["holds"] = bool(b["gen_delta"]["mean"] is not None and b["gen_delta"]["mean"] > 0 and b["non_delta"]["mean"] < 0)
    wins = {}
    for m in cfg.modes:
        k = sum((per[(m, s)] or {}).get("overall", {}).get("win_k") or 0 for s in seeds)
        n = sum((per[(m, s)] or {}).get("overall", {}).get("win_n") or 0 for s in seeds)
        fa = sum((per[(m, s)] or {}).get("overall", {}).get("fixed_fa") or 0 for s in seeds)
        wins[m] = {"win_rate": table[m]["overall"]["win"], "pooled": k / n if n else None, "wins": k, "n": n,
                   "fewer_false_positives_share": fa / k if k else None}
    generation_only = [m for m in ("sft", "c-sft") if m in cfg.modes]
    claims["c"] = {"by_mode": wins, "holds": bool(generation_only) and all(
        (wins[m]["pooled"] or 0) > 0.5 and (wins[m]["fewer_false_positives_share"] or 0) > 0.5 for m in generation_only)}
    claims["d"] = {m: {"admitted": counts[m]["replay_admitted"], "added": counts[m]["replay_added"],
                       "gen_vs_no_replay": mean_std([per[(m, s)]["overall"]["gen"] - per[(m[2:], s)]["overall"]["gen"]
                                                     for s in seeds if per[(m, s)] and per[(m[2:], s)]])}
                   for m in ("c-sft", "c-dpo") if m in cfg.modes and m[2:] in cfg.modes}
    corrupt = {"gen_delta": delta("corrupt", "gen"), "non_delta": delta("corrupt", "non"),
               "gate_precision": counts["corrupt"]["gate_precision"],
               "clean_gate_precision": counts.get("c-sft", {}).get("gate_precision"),
               "gate_fired": [data_counts(summaries[(s, "corrupt")])["gate_fired"] for s in seeds
                              if (s, "corrupt") in summaries],
               "corruption": {"mode": cfg.corrupt_judge.mode, "rate": cfg.corrupt_judge.rate}}
    corrupt["pattern"] = bool(corrupt["gen_delta"]["mean"] is not None and corrupt["gen_delta"]["mean"] < 0
                              and corrupt["non_delta"]["mean"] < 0)
    corrupt["holds"] = corrupt["pattern"] and bool(corrupt["gate_fired"]) and all(corrupt["gate_fired"])
    claims["e"] = corrupt
    if "c-sft" in cfg.modes:
        gap = [table["base"][t]["non"]["mean"] for t in TASKS]
        gain = [delta("c-sft", "gen", t)["mean"] for t in TASKS]
        pts = [(g, d) for g, d in zip(gap, gain) if g is not None and d is not None]
        claims["f"] = {"tasks": {t: {"gap": g, "gen_gain": d} for t, g, d in zip(TASKS, gap, gain)},
                       "spearman": spearman([p[0] for p in pts], [p[1] for p in pts]), "n": len(pts)}
        claims["f"]["holds"] = claims["f"]["spearman"] is not None and claims["f"]["spearman"] > 0
    rounds = {}
    if "c-sft" in cfg.modes:
        for i in range(cfg.rounds + 1):
            figs = [method_summary(summaries, "c-sft", s, str(i)) if i else method_summary(summaries, "base", s)
                    for s in seeds]
            rounds[i] = {k: mean_std([(f or {}).get("overall", {}).get(k) for f in figs]) for k in ("gen", "non", "win")}
    gates = {}  # name -> per round: audited precision over seeds, and on how many seeds the gate fired
    for name in [*cfg.modes, "corrupt"]:
        n_rounds = cfg.rounds if name == "c-sft" else 1
        audits = [[(summaries[(s, name)]["rounds_data"].get(str(r)) or {}).get("gate", {}) for s in seeds
                   if (s, name) in summaries] for r in range(n_rounds)]
        gates[name] = [{"precision": mean_std([a.get("precision") for a in at]),
                        "fired": sum(bool(a.get("fired")) for a in at), "seeds": len(at)} for at in audits]
    targets = {}
    if "c-sft" in cfg.modes:
        g, n, w = claims["b"]["c-sft"]["gen_delta"]["mean"], claims["b"]["c-sft"]["non_relative"]["mean"], \
            table["c-sft"]["overall"]["win"]["mean"]
        targets = {"c-sft gen +10 points": {"value": g, "met": g is not None and g >= 0.10},
                   "c-sft non -40% relative": {"value": n, "met": n is not None and n <= -0.40},
                   "c-sft win rate >= 55%": {"value": w, "met": w is not None and w >= 0.55},
                   "corrupted judge: co-degradation and gate fires": {"value": None, "met": corrupt["holds"]}}
    composition = {m: {k: mean_std([((method_summary(summaries, m, s, split="composition") or {}).get("overall")
                                      or {}).get(k) for s in seeds]) for k in ("gen", "non")} for m in methods}
    return {"seeds": seeds, "table": table, "counts": counts, "claims": claims, "rounds": rounds, "gates": gates,
            "targets": targets, "diagnostic": diagnostics, "composition": composition}


# ---- the diagnostic over a run's checkpoints ------------------------------------------------------------------
def run_diagnostic(cfg, run_cfg, run_dir: Path) -> list[dict]:
    """gapray/diagnostics.py at the base model and after every epoch of an SFT run, with the understanding
    accuracy on all the base model's held-out images at the same checkpoint."""
    import pyarrow.parquet as pq
    import torch
    from omegaconf import OmegaConf

    from gapray.models.loading import load_model
    from gapray.data.ledger import VerdictLedger
    from gapray.diagnostics import gradient_alignment
    from gapray.rundir import RunDir
    from gapray.train.loop import freeze_for_training
    from gapray.verdict import to_verdict
    from gapray.world.pretrain import decode_batched

    rng = np.random.default_rng(run_cfg.seed)
    paths = RunDir(run_dir)
    sft = pq.read_table(paths.data(0) / "sft.parquet", columns=["prompt", "image_tokens"]).to_pylist()
    train = [sft[i] for i in sorted(rng.choice(len(sft), min(cfg.diagnostic.train_samples, len(sft)), replace=False))]
    base_rows = VerdictLedger(paths.eval_ledger()).read(0).to_pylist()
    base_rows.sort(key=lambda r: (r["prompt_id"], r["sample_idx"]))
    half = cfg.diagnostic.heldout_samples // 2
    heldout = []
    for label in (1, 0):
        pool = [r for r in base_rows if r["oracle_verdict"] == label]
        heldout += [pool[i] for i in sorted(rng.choice(len(pool), min(half, len(pool)), replace=False))]
    epochs = run_cfg.train.epochs
    ckpts = [(0, run_cfg.model.path)] + [(e, str(paths.train(0, "a") / f"model_epoch{e}"))
                                         for e in range(1, epochs)]
    ckpts.append((epochs, str(paths.train(0, "a") / "model")))
    images = None
    out = []
    for epoch, path in ckpts:
        jm = load_model(OmegaConf.merge(run_cfg.model, {"path": path}))
        if images is None:  # the VQ decoder is never trained: decode once
            images = decode_batched(jm, torch.tensor([r["image_tokens"] for r in base_rows]), batch=64)
            by_key = {(r["prompt_id"], r["sample_idx"]): images[i] for i, r in enumerate(base_rows)}
            heldout = [{**r, "image": by_key[(r["prompt_id"], r["sample_idx"])]} for r in heldout]
        params = freeze_for_training(jm.model, run_cfg.train.trainable)
        figures = gradient_alignment(jm, params, train, heldout)
        verdicts = []
        for i in range(0, len(base_rows), 64):
            chunk = base_rows[i:i + 64]
            p = jm.score([r["prompt"] for r in chunk], images[i:i + 64], mode=run_cfg.scoring.mode).p_aligned
            verdicts += [to_verdict(x, run_cfg.scoring.threshold) for x in p]
        correct = sum(v == r["oracle_verdict"] for v, r in zip(verdicts, base_rows))
        out.append({"epoch": epoch, **figures, "und_acc": correct / len(base_rows), "n_images": len(base_rows)})
        print(f"[diagnostic] seed {run_cfg.seed} epoch {epoch}: <g_gen, g_und(prompt)> {figures['prompt']['inner']:.4g}, "
              f"<g_gen, g_und(verdict)> {figures['verdict']['inner']:.4g}, und. acc {correct / len(base_rows):.3f}",
              flush=True)
    return out


# ---- output --------------------------------------------------------------------------------------------------
def pm(x: dict, scale: float = 100.0, digits: int = 1) -> str:
    if x is None or x.get("mean") is None:
        return "-"
    return f"{scale * x['mean']:.{digits}f} ± {scale * x['std']:.{digits}f}"


def write_results(cfg, results: dict, out_dir: Path) -> None:
    t, c = results["table"], results["claims"]
    methods = list(t)
    n_seeds = len(results["seeds"])
    L = [f"# Reproduction on the shapes world ({n_seeds} seeds: {results['seeds']})", "",
         "Held-out eval split, %, mean ± std over seeds. Gen.: oracle accuracy of generations. Und.: understanding "
         "win rate vs the base model on the base model's images (oracle-judged; n = disagreements, summed over "
         "seeds). Non.: non-unification score. Base = measure/0.", "",
         "## Overall", "", "| method | Gen. | Und. win rate (n) | Non. | und. accuracy | SFT rows | DPO pairs | "
         "replay admitted | replay added |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        o = t[m]["overall"]
        k = results["counts"].get(m, {})
        win = "50 (def.)" if m == "base" else f"{pm(o['win'])} ({o['win_n']})"
        L.append(f"| {m} | {pm(o['gen'])} | {win} | {pm(o['non'])} | {pm(o['und_acc'])} | "
                 f"{pm(k.get('sft'), 1, 0)} | {pm(k.get('dpo'), 1, 0)} | {pm(k.get('replay_admitted'), 1, 0)} | "
                 f"{pm(k.get('replay_added'), 1, 0)} |")
    for key, title in (("gen", "Gen. per task"), ("non", "Non. per task"), ("win", "Und. win rate per task")):
        L += ["", f"## {title}", "", "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
        for m in methods:
            if key == "win" and m == "base":
                continue
            L.append(f"| {m} | " + " | ".join(pm(t[m][x][key]) + (f" ({t[m][x]['win_n']})" if key == "win" else "")
                                             for x in TASKS) + " |")
    comp = results.get("composition", {})
    if any(v["gen"]["n"] for v in comp.values()):  # runs measured with composition_prompts
        L += ["", "## Composition split (held-out bindings: the stress test, reported apart)", "",
              "| method | Gen. | Non. |", "|---|---:|---:|"] + [f"| {m} | {pm(v['gen'])} | {pm(v['non'])} |"
                                                          for m, v in comp.items()]
    L += ["", "## Claims", ""]
    a = c["a"]
    L.append(f"- (a) the gap stems from weak generation: base weak-generation rate {pm(a['weak_generation_rate'])}% "
             f"(share of self-rejected images the oracle also rejects) -> {'holds' if a['holds'] else 'does not hold'}.")
    for m, b in c["b"].items():
        L.append(f"- (b) {m}: Gen. {pm(b['gen_delta'])} points, Non. {pm(b['non_delta'])} points "
                 f"({pm(b['non_relative'], 100, 0)}% relative) -> {'holds' if b['holds'] else 'does not hold'}.")
    for m, w in c["c"]["by_mode"].items():
        share = "-" if w["fewer_false_positives_share"] is None else f"{100 * w['fewer_false_positives_share']:.0f}%"
        pooled = "-" if w["pooled"] is None else f"{100 * w['pooled']:.1f}%"
        L.append(f"- (c) {m}: win rate {pm(w['win_rate'])} % (pooled {pooled}, {w['wins']} of {w['n']}); "
                 f"wins that reject a base false positive: {share}.")
    L.append(f"  (c) holds for the generation-only objectives: {c['c']['holds']}.")
    for m, d in c.get("d", {}).items():
        L.append(f"- (d) {m}: replay admitted {pm(d['admitted'], 1, 1)} prompts, added {pm(d['added'], 1, 1)} rows; "
                 f"Gen. vs {m[2:]} without replay {pm(d['gen_vs_no_replay'])} points.")
    e = c["e"]
    L.append(f"- (e) corrupted judge ({e['corruption']['mode']} at rate {e['corruption']['rate']}, c-sft): Gen. "
             f"{pm(e['gen_delta'])} points, Non. {pm(e['non_delta'])} points; gate precision {pm(e['gate_precision'], 1, 2)} "
             f"(clean c-sft {pm(e['clean_gate_precision'], 1, 2)}), gate fired on {sum(map(bool, e['gate_fired']))} of "
             f"{len(e['gate_fired'])} seeds -> co-degradation pattern {'seen' if e['pattern'] else 'not seen'}.")
    if "f" in c:
        f = c["f"]
        rho = "-" if f["spearman"] is None else f"{f['spearman']:.2f}"
        L.append(f"- (f) C-SFT's Gen. gain vs the task's base Non. (internal gap), across {f['n']} tasks: Spearman "
                 f"rho {rho} (the paper: 0.53 across subtasks). " + ", ".join(
                     f"{x}: gap {100 * v['gap']:.0f}, gain {100 * v['gen_gain']:+.1f}" for x, v in f["tasks"].items()
                     if v["gap"] is not None and v["gen_gain"] is not None))
    if results["rounds"]:
        L += ["", "## Iterated rounds (c-sft)", "", "| after round | Gen. | Non. | Und. win rate |", "|---|---:|---:|---:|"]
        for i, r in results["rounds"].items():
            L.append(f"| {i} | {pm(r['gen'])} | {pm(r['non'])} | {pm(r['win'])} |")
    L += ["", f"## Data-quality gate (oracle audit of accepted training images; fires below precision "
          f"{results['run']['gate']['min_precision']}; recorded, not obeyed)", "", "| run | round | precision | fired on |", "|---|---:|---:|---:|"]
    for name, per_round in results["gates"].items():
        for r, g in enumerate(per_round):
            L.append(f"| {name} | {r} | {pm(g['precision'], 1, 2)} | {g['fired']} of {g['seeds']} seeds |")
    if results["targets"]:
        L += ["", "## The issue's targets", ""]
        for name, v in results["targets"].items():
            val = "" if v["value"] is None else f" (reached {100 * v['value']:+.1f})"
            L.append(f"- {name}: {'met' if v['met'] else 'NOT met'}{val}")
    if results["diagnostic"]:
        L += ["", "## Learning dynamics (sft runs)", "",
              "Per epoch of SFT: mean inner product of generation gradients on training samples with understanding "
              "gradients on held-out samples (prompt: log p(prompt | image); verdict: log p(oracle's verdict | image, "
              "question)), cosine of the mean gradients, and the understanding accuracy on all base held-out images.", "",
              "| epoch | <g_gen, g_prompt> | cos | <g_gen, g_verdict> | cos | positive pairs (verdict) | und. accuracy |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in diagnostic_table(results["diagnostic"]):
            L.append(f"| {row['epoch']} | {pm(row['prompt_inner'], 1, 3)} | {pm(row['prompt_cos'], 1, 3)} | "
                     f"{pm(row['verdict_inner'], 1, 3)} | {pm(row['verdict_cos'], 1, 3)} | {pm(row['verdict_pos'])} | "
                     f"{pm(row['und_acc'])} |")
    L += ["", "![rounds](plots/rounds.png) ![diagnostic](plots/diagnostic.png) ![gap vs gain](plots/gap_vs_gain.png)", ""]
    (out_dir / "results.md").write_text("\n".join(L))


def diagnostic_table(diagnostics: dict) -> list[dict]:
    """Per epoch, mean +- std over seeds of the diagnostic's figures."""
    epochs = sorted({d["epoch"] for rows in diagnostics.values() for d in rows})
    out = []
    for e in epochs:
        at = [d for rows in diagnostics.values() for d in rows if d["epoch"] == e]
        out.append({"epoch": e, "prompt_inner": mean_std([d["prompt"]["inner"] for d in at]),
                    "prompt_cos": mean_std([d["prompt"]["cosine"] for d in at]),
                    "verdict_inner": mean_std([d["verdict"]["inner"] for d in at]),
                    "verdict_cos": mean_std([d["verdict"]["cosine"] for d in at]),
                    "verdict_pos": mean_std([d["verdict"]["positive_share"] for d in at]),
                    "und_acc": mean_std([d["und_acc"] for d in at])})
    return out


def write_plots(results: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    if results["rounds"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [int(i) for i in results["rounds"]]
        for key, label in (("gen", "Gen."), ("non", "Non.")):
            m = np.array([results["rounds"][i][key]["mean"] for i in results["rounds"]], dtype=float) * 100
            s = np.array([results["rounds"][i][key]["std"] for i in results["rounds"]], dtype=float) * 100
            ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=label)
        ax.set_xlabel("c-sft round (0 = base)")
        ax.set_xticks(xs)
        ax.set_ylabel("% (held-out)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "rounds.png", dpi=100)
        plt.close(fig)
    if results["diagnostic"]:
        rows = diagnostic_table(results["diagnostic"])
        fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
        xs = [r["epoch"] for r in rows]
        for key, label in (("prompt_cos", "cos(g_gen, g_prompt)"), ("verdict_cos", "cos(g_gen, g_verdict)")):
            ax[0].plot(xs, [r[key]["mean"] for r in rows], "o-", label=label)
        ax[0].axhline(0, color="grey", lw=0.5)
        ax[0].set_xlabel("SFT epoch")
        ax[0].legend(fontsize=7)
        ax[1].plot(xs, [100 * r["und_acc"]["mean"] for r in rows], "s-")
        ax[1].set_xlabel("SFT epoch")
        ax[1].set_ylabel("understanding accuracy % (held-out)")
        fig.tight_layout()
        fig.savefig(out_dir / "diagnostic.png", dpi=100)
        plt.close(fig)
    f = results["claims"].get("f")
    if f:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for task, v in f["tasks"].items():
            if v["gap"] is not None and v["gen_gain"] is not None:
                ax.scatter(100 * v["gap"], 100 * v["gen_gain"])
                ax.annotate(task, (100 * v["gap"], 100 * v["gen_gain"]), fontsize=7)
        ax.set_xlabel("base Non. % (internal gap)")
        ax.set_ylabel("c-sft Gen. gain (points)")
        fig.tight_layout()
        fig.savefig(out_dir / "gap_vs_gain.png", dpi=100)
        plt.close(fig)
