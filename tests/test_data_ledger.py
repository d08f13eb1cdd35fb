"""The verdict ledger and the preference data built from it, without Ray: keyed, idempotent, exact."""

import math

import pyarrow.parquet as pq
import pytest
import torch

from gapray.data.ledger import VerdictLedger
from gapray.data.preference import build_preference_data
from gapray.models.base import local_reference
from gapray.data.schemas import DISCARD_SCHEMA, DPO_SCHEMA, LEDGER_SCHEMA, SFT_SCHEMA
from gapray.prompts import Prompt
from gapray.verdict import to_verdict

T = 64  # image tokens of the tiny model


def image_tokens(pid, idx):
    return [sum(map(ord, pid)) % 64, idx, len(pid)] + [(5 * idx + len(pid)) % 64] * (T - 3)


def row(round, pid, idx, p, prompt=None, verdict="auto"):
    """A ledger row whose image tokens encode its key, so a test can tell which image went where."""
    return {"round": round, "prompt_id": pid, "task": "colors", "prompt": prompt or f"a photo of {pid}",
            "sample_idx": idx, "seed": 1000 * idx + len(pid), "image_tokens": image_tokens(pid, idx),
            "logprob": -1.5, "p_aligned": p, "verdict": to_verdict(p, 0.5) if verdict == "auto" else verdict,
            "answer": None, "oracle_verdict": None, "judge_model": None, "judge_p": None,
            "policy_version": 3}


# p_aligned per prompt; threshold 0.5
CASES = {
    "mixed": [0.9, 0.2, 0.7, 0.4],  # accepted 0, 2; pair 0 (0.9) vs 1 (0.2)
    "none": [0.1, 0.3, 0.45, 0.05],  # all rejected: discard pool
    "all": [0.6, 0.8, 0.8, 0.51],  # all accepted: SFT only, no pair
    "close": [0.55, 0.45, 0.52, 0.48],  # pair margin 0.10: dropped at min_margin 0.2
    "ties": [0.7, 0.9, 0.9, 0.3],  # two most confident accepted tie: the lower sample_idx (1) wins
}


def case_rows(round=0):
    return [row(round, pid, j, p) for pid, ps in CASES.items() for j, p in enumerate(ps)]


def test_ledger_is_keyed_and_idempotent(tmp_path):
    ledger = VerdictLedger(tmp_path / "ledger")
    rows = case_rows()
    assert ledger.write(0, rows[:12]) == 12
    assert ledger.count(0) == 12
    parts = ledger.parts(0)
    assert ledger.write(0, rows[:12]) == 0  # the same round again: nothing twice
    assert ledger.parts(0) == parts and ledger.count(0) == 12
    assert ledger.write(0, rows[8:] + rows[8:]) == len(rows) - 12  # only the new keys, each once
    assert ledger.count(0) == len(rows) == len(ledger.keys(0))
    t = ledger.read(0)
    assert t.schema.equals(LEDGER_SCHEMA)
    key = lambda r: (r["prompt_id"], r["sample_idx"])
    assert sorted(t.to_pylist(), key=key) == sorted(rows, key=key)  # nothing lost or altered
    assert ledger.rounds() == [0] and ledger.count(1) == 0


def test_write_part_is_content_addressed(tmp_path):
    """A retried write of one batch (a Ray task run twice) lands on the same part file."""
    ledger = VerdictLedger(tmp_path)
    import pyarrow as pa

    batch = pa.Table.from_pylist(case_rows()[:4], schema=LEDGER_SCHEMA)
    first = ledger.write_part(0, batch)
    assert ledger.write_part(0, batch) == first and ledger.count(0) == 4
    assert not list(first.parent.glob(".*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="rounds"):
        ledger.write_part(1, batch)
    with pytest.raises(ValueError, match="repeats a key"):
        ledger.write_part(0, pa.concat_tables([batch, batch.slice(0, 1)]))


def test_missing_lists_exactly_the_work_left(tmp_path):
    ledger = VerdictLedger(tmp_path)
    prompts = [Prompt(pid, "colors", f"a photo of {pid}") for pid in CASES]
    assert ledger.missing(0, prompts, 4) == [(p, [0, 1, 2, 3]) for p in prompts]
    written = [r for r in case_rows() if r["sample_idx"] != 2 or r["prompt_id"] == "all"]
    ledger.write(0, written)
    todo = ledger.missing(0, prompts, 4)
    assert [(p.prompt_id, idx) for p, idx in todo] == [(pid, [2]) for pid in CASES if pid != "all"]
    ledger.write(0, case_rows())
    assert ledger.missing(0, prompts, 4) == [] and ledger.count(0) == 20


def test_preference_data_follows_the_verdicts(tmp_path):
    ledger = VerdictLedger(tmp_path / "ledger")
    rows = case_rows(round=2)
    rows.append(row(2, "unparsed", 0, math.nan, verdict=None))  # generate mode, no parse: neither side
    rows.append(row(2, "unparsed", 1, 0.0))
    rows.append(row(2, "unparsed", 2, 1.0))
    ledger.write(2, rows)
    counts = build_preference_data(ledger, 2, tmp_path / "data", min_margin=0.2)
    sft = pq.read_table(tmp_path / "data/sft.parquet")
    dpo = pq.read_table(tmp_path / "data/dpo.parquet")
    discard = pq.read_table(tmp_path / "data/discard.parquet")
    assert sft.schema.equals(SFT_SCHEMA) and dpo.schema.equals(DPO_SCHEMA) and discard.schema.equals(DISCARD_SCHEMA)
    tokens = {(r["prompt_id"], r["sample_idx"]): r["image_tokens"] for r in rows}

    # SFT: every accepted image and nothing else, in (prompt_id, sample_idx) order, with its own tokens
    accepted = sorted((r["prompt_id"], r["sample_idx"]) for r in rows if r["verdict"] == 1)
    assert [(r["prompt_id"], r["sample_idx"]) for r in sft.to_pylist()] == accepted
    assert all(r["image_tokens"] == tokens[(r["prompt_id"], r["sample_idx"])] and r["round"] == 2
               for r in sft.to_pylist())

    # DPO: best accepted vs worst rejected, only with margin >= 0.2; ties to the lower sample_idx
    pairs = {r["prompt_id"]: r for r in dpo.to_pylist()}
    assert sorted(pairs) == ["mixed", "ties", "unparsed"]  # "close" (margin 0.1) dropped; "all"/"none" have no pair
    expect = {"mixed": (0, 1), "ties": (1, 3), "unparsed": (2, 1)}
    for pid, (ci, ri) in expect.items():
        r = pairs[pid]
        assert r["chosen_tokens"] == tokens[(pid, ci)] and r["rejected_tokens"] == tokens[(pid, ri)]
        assert r["chosen_p"] - r["rejected_p"] >= 0.2
        assert r["ref_chosen_logp"] is None and r["ref_rejected_logp"] is None
    assert pairs["mixed"]["chosen_p"] == 0.9 and pairs["mixed"]["rejected_p"] == 0.2

    # discard pool: prompts without an accepted image
    assert discard.to_pylist() == [{"round": 2, "prompt_id": "none", "task": "colors", "prompt": "a photo of none",
                                    "n_images": 4, "n_unparsed": 0, "max_p_aligned": 0.45}]
    assert counts == {"prompts": 6, "images": 23, "sft": len(accepted), "dpo": 3, "discard": 1}


def test_preference_data_does_not_depend_on_part_layout(tmp_path):
    """The same verdicts stored as one part or as many give byte-identical preference data."""
    rows = case_rows()
    one, many = VerdictLedger(tmp_path / "one"), VerdictLedger(tmp_path / "many")
    one.write(0, rows)
    for i in range(len(rows), 0, -3):
        many.write(0, rows[max(0, i - 3):i])
    assert len(many.parts(0)) > 1
    build_preference_data(one, 0, tmp_path / "d1")
    build_preference_data(many, 0, tmp_path / "d2", prompts_per_chunk=2)
    for name in ("sft", "dpo", "discard"):
        assert pq.read_table(tmp_path / f"d1/{name}.parquet").equals(pq.read_table(tmp_path / f"d2/{name}.parquet"))


def test_reference_logprobs_are_the_models_conditional_logprobs(tmp_path, tiny):
    ledger = VerdictLedger(tmp_path)
    rows = [row(0, "mixed", j, p, prompt="a photo of a red circle") for j, p in enumerate(CASES["mixed"])]
    rows += [row(0, "ties", j, p, prompt="a photo of two blue squares") for j, p in enumerate(CASES["ties"])]
    ledger.write(0, rows)
    build_preference_data(ledger, 0, tmp_path / "data", reference=local_reference(tiny, batch_size=3))
    dpo = pq.read_table(tmp_path / "data/dpo.parquet").to_pylist()
    assert len(dpo) == 2
    for r in dpo:
        tokens = torch.tensor([r["chosen_tokens"], r["rejected_tokens"]])
        with torch.no_grad():
            want = tiny.image_logprobs([r["prompt"]] * 2, tokens, sampling=None).sum(-1)
        torch.testing.assert_close(torch.tensor([r["ref_chosen_logp"], r["ref_rejected_logp"]]), want,
                                   rtol=1e-5, atol=1e-4)
