"""Preference data from the verdict ledger (PAPER.md, Algorithm 1 and its DPO variant).

From one round of verdicts it writes, under `<run_dir>/data/round=R/`:
  sft.parquet      (SFT_SCHEMA)      every accepted image with its prompt;
  dpo.parquet      (DPO_SCHEMA)      per prompt with an accepted and a rejected image: the most confident
                                     accepted one (highest p_aligned) as chosen, the least confident
                                     rejected one (lowest p_aligned) as rejected, kept when
                                     chosen_p - rejected_p >= min_margin; ties go to the lower sample_idx;
  discard.parquet  (DISCARD_SCHEMA)  prompts with no accepted image (the pool curriculum replay retries).
Unparsed answers (generate mode, verdict null) are neither accepted nor rejected.

Optionally the DPO rows carry reference log-probs (sum over image tokens of the conditional log-prob,
`UnifiedModel.image_logprobs(..., sampling=None)`), computed in the same pass by a `reference` function
(gapray.models.base.local_reference, or the Serve replicas through gapray.backends.ray.serve_reference), so the trainer needs
no reference model. The reference is whatever policy that function runs: the serving policy of the round.

Image tokens: as sampled, or (`reencode`) those of the decoded picture, VQ-encoded again. A sampled sequence
is not what the VQ encoder makes of its own picture (for the shapes model re-encoding changes 71% of the
tokens); a trainer that reads images, as the paper's does, sees the
encoder's. jobs/probe_sft.py measures what training on each does.

Poor supervision on purpose (issue 7's co-degradation check): `corrupt_verdicts` turns a share of the
verdicts over (flip) or replaces them by a coin (noise) before they are planned; the ledger keeps the truth.

Memory: the plan (which image goes where) is made from the ledger's scalar columns; image tokens are read
a chunk of prompts at a time. Output rows are ordered by (prompt_id, sample_idx), whatever the layout of
the ledger's part files, so the same verdicts always give the same files.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gapray.data.integrity import publish
from gapray.data.ledger import VerdictLedger
from gapray.data.schemas import DISCARD_SCHEMA, DPO_SCHEMA, SFT_SCHEMA
from gapray.models.sampler import derive_seed

# a ledger table -> the same rows with other verdicts (corrupt_verdicts)
Verdicts = Callable[[pa.Table], pa.Table]
# sampled image tokens -> the tokens training reads: those of the decoded picture (UnifiedModel.reencode)
Reencode = Callable[[list[list[int]]], list[list[int]]]
# (prompts, image tokens) -> one summed conditional log-prob per image
Reference = Callable[[list[str], list[list[int]]], list[float]]
PLAN_COLUMNS = ["prompt_id", "task", "prompt", "sample_idx", "p_aligned", "verdict"]
OUTPUTS = {"sft": SFT_SCHEMA, "dpo": DPO_SCHEMA, "discard": DISCARD_SCHEMA}


@dataclasses.dataclass
class PromptPlan:
    """What one prompt's verdicts contribute: SFT images, a DPO pair, or a place in the discard pool."""
    prompt_id: str
    task: str
    prompt: str
    n_images: int
    n_unparsed: int
    max_p_aligned: float | None
    accepted: list[tuple[int, float]]  # (sample_idx, p_aligned), by sample_idx
    pair: tuple[tuple[int, float], tuple[int, float]] | None  # ((chosen idx, p), (rejected idx, p))

    @property
    def discarded(self) -> bool:
        return not self.accepted


def plan_prompt(rows: list[dict], min_margin: float = 0.0) -> PromptPlan:
    """One prompt's verdict rows (PLAN_COLUMNS) -> its plan."""
    first = rows[0]
    accepted = sorted((r["sample_idx"], r["p_aligned"]) for r in rows if r["verdict"] == 1)
    rejected = [(r["sample_idx"], r["p_aligned"]) for r in rows if r["verdict"] == 0]
    pair = None
    if accepted and rejected:
        chosen = max(accepted, key=lambda a: (a[1], -a[0]))
        worst = min(rejected, key=lambda a: (a[1], a[0]))
        if chosen[1] - worst[1] >= min_margin:
            pair = (chosen, worst)
    parsed = [r["p_aligned"] for r in rows if r["verdict"] is not None]
    return PromptPlan(first["prompt_id"], first["task"], first["prompt"], len(rows),
                      sum(r["verdict"] is None for r in rows), max(parsed) if parsed else None, accepted, pair)


def plan_round(table: pa.Table, min_margin: float = 0.0) -> list[PromptPlan]:
    """A round's scalar columns (PLAN_COLUMNS) -> one plan per prompt, by prompt_id."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in table.select(PLAN_COLUMNS).to_pylist():
        groups[r["prompt_id"]].append(r)
    return [plan_prompt(groups[pid], min_margin) for pid in sorted(groups)]


def corrupt_verdicts(table: pa.Table, mode: str, rate: float, seed: int, threshold: float = 0.5) -> pa.Table:
    """A judge made worse on purpose: each row is corrupted with probability `rate`, decided by a hash of
    (seed, prompt_id, sample_idx) alone, so a resumed or re-read round corrupts the same rows.
    flip: verdict 1 <-> 0, p_aligned -> 1 - p_aligned; noise: p_aligned ~ U(0, 1), verdict = p >= threshold.
    Unparsed rows (verdict null) stay unparsed."""
    if mode == "none" or rate == 0:
        return table
    verdict, p = table.column("verdict").to_pylist(), table.column("p_aligned").to_pylist()
    for i, (pid, j) in enumerate(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist())):
        coin, draw = np.random.default_rng(derive_seed(seed, "corrupt", pid, j)).random(2)
        if verdict[i] is None or coin >= rate:
            continue
        p[i] = 1.0 - p[i] if mode == "flip" else float(draw)
        verdict[i] = 1 - verdict[i] if mode == "flip" else int(p[i] >= threshold)
    for name, values in (("verdict", verdict), ("p_aligned", p)):
        field = table.schema.field(name)
        table = table.set_column(table.column_names.index(name), field, pa.array(values, field.type))
    return table


def build_preference_data(ledger: VerdictLedger, round: int, out_dir: str | Path, *, min_margin: float = 0.0,
                          reference: Reference | None = None, verdicts: Verdicts | None = None,
                          reencode: Reencode | None = None, prompts_per_chunk: int = 512) -> dict:
    """Write sft/dpo/discard.parquet for one round of the ledger; returns counts. Files appear atomically,
    each with its manifest entry.
    `verdicts`, if given, replaces the ledger's verdicts before planning (corrupt_verdicts); `reencode`, if
    given, maps the sampled tokens of the images used to the tokens the rows carry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ledger.read(round, PLAN_COLUMNS)
    plans = plan_round(table if verdicts is None else verdicts(table), min_margin)
    tmp = {name: out_dir / f".{name}.parquet.{os.getpid()}.tmp" for name in OUTPUTS}
    writers = {name: pq.ParquetWriter(tmp[name], schema) for name, schema in OUTPUTS.items()}
    counts = {"prompts": len(plans), "images": sum(p.n_images for p in plans), "sft": 0, "dpo": 0, "discard": 0}
    try:
        for start in range(0, len(plans), prompts_per_chunk):
            chunk = plans[start:start + prompts_per_chunk]
            tokens = _chunk_tokens(ledger, round, chunk)
            if reencode is not None and tokens:
                keys = list(tokens)
                tokens = dict(zip(keys, reencode([tokens[k] for k in keys])))
            sft = [_sft_row(round, p, idx, pa_, tokens) for p in chunk for idx, pa_ in p.accepted]
            dpo = [_dpo_row(round, p, tokens) for p in chunk if p.pair is not None]
            if reference is not None and dpo:
                ref = reference([r["prompt"] for r in dpo] * 2,
                                [r["chosen_tokens"] for r in dpo] + [r["rejected_tokens"] for r in dpo])
                for i, r in enumerate(dpo):
                    r["ref_chosen_logp"], r["ref_rejected_logp"] = ref[i], ref[len(dpo) + i]
            discard = [_discard_row(round, p) for p in chunk if p.discarded]
            for name, rows in (("sft", sft), ("dpo", dpo), ("discard", discard)):
                if rows:
                    writers[name].write_table(pa.Table.from_pylist(rows, schema=OUTPUTS[name]))
                counts[name] += len(rows)
    finally:
        for w in writers.values():
            w.close()
    for name in OUTPUTS:
        publish(tmp[name], out_dir / f"{name}.parquet")  # with its manifest entry (gapray.data.integrity)
    return counts


def _chunk_tokens(ledger: VerdictLedger, round: int, chunk: list[PromptPlan]) -> dict[tuple[str, int], list[int]]:
    """Image tokens of the images a chunk of plans uses, and of no others."""
    wanted = {(p.prompt_id, idx) for p in chunk for idx, _ in p.accepted}
    wanted |= {(p.prompt_id, side[0]) for p in chunk if p.pair for side in p.pair}
    if not wanted:
        return {}
    ids = pa.array(sorted({pid for pid, _ in wanted}), pa.string())
    t = ledger.dataset(round).to_table(columns=["prompt_id", "sample_idx", "image_tokens"],
                                       filter=pc.field("prompt_id").isin(ids))
    out = {}
    for pid, idx, tok in zip(t.column("prompt_id").to_pylist(), t.column("sample_idx").to_pylist(),
                             t.column("image_tokens").to_pylist()):
        if (pid, idx) in wanted:
            out[(pid, idx)] = tok
    return out


def _sft_row(round: int, p: PromptPlan, idx: int, p_aligned: float, tokens: dict) -> dict:
    return {"round": round, "prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt, "sample_idx": idx,
            "image_tokens": tokens[(p.prompt_id, idx)], "p_aligned": p_aligned}


def _dpo_row(round: int, p: PromptPlan, tokens: dict) -> dict:
    (ci, cp), (ri, rp) = p.pair
    return {"round": round, "prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt,
            "chosen_tokens": tokens[(p.prompt_id, ci)], "rejected_tokens": tokens[(p.prompt_id, ri)],
            "chosen_p": cp, "rejected_p": rp, "ref_chosen_logp": None, "ref_rejected_logp": None}


def _discard_row(round: int, p: PromptPlan) -> dict:
    return {"round": round, "prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt, "n_images": p.n_images,
            "n_unparsed": p.n_unparsed, "max_p_aligned": p.max_p_aligned}
