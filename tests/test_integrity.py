"""Integrity of a run directory (gapray/data/integrity.py): damaged, foreign and missing files are named with their
fix, by the ledger's reads, by jobs/self_improve.py before any phase runs (one line, exit code 2, run_dir
untouched) and by `gapray verify`; a ledger part moved aside is drawn again, the same rows. No Ray: run
directories are made here with the ledger and preference code (the job itself on a real run: test_curriculum.py)."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from gapray.cli import main as gapray
from gapray.config import CONF_DIR, SelfImproveConfig, load_config
from gapray.backends.local import LocalBackend
from gapray.curriculum import RunState, plan_phases
from gapray.data.integrity import MANIFEST, verify_run_dir
from gapray.data.ledger import VerdictLedger
from gapray.data.preference import build_preference_data
from gapray.data.schemas import LEDGER_SCHEMA, SFT_SCHEMA
from gapray.errors import UserError
from gapray.prompts import load_prompts

REPO = Path(__file__).resolve().parent.parent
ARGS = ["model=tiny", "backend=local", "train.backend=local", "max_prompts=4", "images_per_prompt=3",
        "max_eval_prompts=2", "eval_images_per_prompt=2", "batch_prompts=2", "gate.min_precision=0"]


def self_improve(args):
    sys.path.insert(0, str(REPO / "jobs"))
    from self_improve import main
    return main(list(args))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows(pids, k=3):
    return [{"round": 0, "prompt_id": pid, "task": "colors", "prompt": f"a photo of {pid}", "sample_idx": j,
             "seed": 100 * i + j, "image_tokens": [i, j] * 32, "logprob": -1.5, "p_aligned": p,
             "verdict": int(p >= 0.5), "answer": None, "oracle_verdict": None, "policy_version": 0}
            for i, pid in enumerate(pids) for j, p in enumerate([0.9, 0.2, 0.7][:k])]


def make_run(run_dir: Path, finished: bool) -> Path:
    """A run directory as the driver leaves it: config, state, two ledger parts of round 0, its preference data;
    finished: every phase complete and a training phase's checkpoint and export."""
    cfg = load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml", ARGS + [f"run_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    ledger = VerdictLedger(run_dir / "ledger")
    for pids in (["p0", "p1"], ["p2", "p3"]):
        ledger.write_part(0, pa.Table.from_pylist(rows(pids), schema=LEDGER_SCHEMA))
    build_preference_data(ledger, 0, run_dir / "data" / "round=0")
    phases = plan_phases(cfg)
    if finished:
        from safetensors.numpy import save_file

        train = run_dir / "checkpoints" / "round=0" / "a"
        (train / "model").mkdir(parents=True)
        (train / "model" / "config.json").write_text(json.dumps({"model_type": "janus"}))
        save_file({"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}, str(train / "model" / "model.safetensors"))
        ckpt = train / "checkpoints" / "checkpoint_000000"
        ckpt.mkdir(parents=True)
        torch.save({"python": list(range(100))}, ckpt / "rng_rank0.pt")
        (ckpt / "train_state.json").write_text(json.dumps({"epoch": 1, "micro_step": 0, "step": 3}))
        (train / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
        (run_dir / "summary.json").write_text(json.dumps({"mode": cfg.mode}))
        RunState(completed=phases, status="done").save(run_dir)
    else:  # interrupted in sample/0
        RunState(completed=phases[:1], current=phases[1]).save(run_dir)
    return run_dir


@pytest.fixture
def interrupted(tmp_path):
    return make_run(tmp_path / "run", finished=False)


@pytest.fixture
def finished(tmp_path):
    return make_run(tmp_path / "run", finished=True)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def verify(run_dir, capsys) -> tuple[int, list[str]]:
    code = gapray(["verify", str(run_dir)])
    return code, capsys.readouterr().out.strip().splitlines()


def test_a_truncated_part_stops_the_resubmitted_job_in_one_line(interrupted, capsys):
    """Today's failure: a 59-line traceback (ArrowInvalid: Parquet magic bytes not found), exit code 1."""
    part = VerdictLedger(interrupted / "ledger").parts(0)[0]
    truncate(part)
    before = tree_digest(interrupted)
    assert self_improve(ARGS + [f"run_dir={interrupted}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(part) in err[0], err
    assert "not a readable Parquet file" in err[0] and f"mv {part} {part}.damaged" in err[0]
    assert "sample/0, not yet complete, draws its rows again with the same seeds" in err[0]
    assert tree_digest(interrupted) == before  # nothing in run_dir touched


def test_the_ledger_names_a_damaged_part_on_every_read(interrupted):
    ledger = VerdictLedger(interrupted / "ledger")
    part = ledger.parts(0)[1]
    part.write_bytes(b"not parquet at all")
    for read in (lambda: ledger.read(0), lambda: ledger.count(0), lambda: ledger.keys(0),
                 lambda: list(ledger.iter_batches(0))):
        with pytest.raises(UserError, match=f"{part}: not a readable Parquet file.*mv {part} {part}.damaged"):
            read()


def test_a_foreign_parquet_file_is_named(interrupted, capsys):
    ledger = VerdictLedger(interrupted / "ledger")
    foreign = ledger.round_dir(0) / "part-foreign.parquet"  # e.g. copied in from another tool's output
    pq.write_table(SFT_SCHEMA.empty_table(), foreign)
    with pytest.raises(UserError, match=f"{foreign}: holds another schema than LEDGER_SCHEMA"):
        ledger.read(0)
    code, out = verify(interrupted, capsys)
    assert code == 2 and len(out) == 1 and out[0].startswith(f"{foreign}: holds another schema than LEDGER_SCHEMA")
    assert "lacks" in out[0] and "seed" in out[0]  # what differs


def test_rows_and_bytes_are_checked_against_the_manifest(interrupted, capsys):
    """A readable part of the right schema that is not the one written (a stale copy, a partial rewrite)."""
    part = VerdictLedger(interrupted / "ledger").parts(0)[0]
    pq.write_table(pa.Table.from_pylist(rows(["p0"], k=2), schema=LEDGER_SCHEMA), part)
    code, out = verify(interrupted, capsys)
    assert code == 2 and out == [f"{part}: holds 2 rows, 6 when it was written; move it aside (mv {part} "
                                 f"{part}.damaged) and submit again: sample/0, not yet complete, draws its rows again "
                                 f"with the same seeds"]
    with pytest.raises(UserError, match="holds 2 rows, 6 when it was written"):
        VerdictLedger(interrupted / "ledger").count(0)


def test_files_written_before_manifests_verify_by_footer_and_schema(interrupted, capsys):
    for d in list(interrupted.rglob(MANIFEST)):
        shutil.rmtree(d)
    assert verify(interrupted, capsys)[0] == 0
    sft = interrupted / "data" / "round=0" / "sft.parquet"
    pq.write_table(LEDGER_SCHEMA.empty_table(), sft)
    code, out = verify(interrupted, capsys)
    assert code == 2 and out[0].startswith(f"{sft}: holds another schema than SFT_SCHEMA")
    assert out[0].endswith("sample/0, not yet complete, writes it again")


def test_gapray_verify_an_intact_run(finished, capsys):
    code, out = verify(finished, capsys)
    assert code == 0 and len(out) == 1, out
    assert out[0].startswith(f"{finished}: intact (") and "5 Parquet" in out[0] and "1 safetensors" in out[0]
    assert "1 torch" in out[0]


@pytest.mark.parametrize("rel, damage, what, fix", [
    ("data/round=0/dpo.parquet", truncate, "not a readable Parquet file",
     "sample/0 is complete, so submitting again does not write it again: restore it from a copy"),
    ("checkpoints/round=0/a/model/model.safetensors", truncate, "truncated", "train/0/a is complete"),
    ("checkpoints/round=0/a/checkpoints/checkpoint_000000/rng_rank0.pt", truncate, "not a whole torch file",
     "train/0/a is complete and reads its resume checkpoints no more: move it aside"),
    ("checkpoints/round=0/a/metrics.jsonl", lambda p: p.write_text('{"step": 1}\n{"step": 2, "lo'), "line 2 is not JSON",
     "train/0/a is complete"),
    ("summary.json", lambda p: p.write_text("{"), "not valid JSON", "report is complete"),
    ("config.yaml", lambda p: p.write_text("run_dir: [unclosed"), "not valid YAML", "restore it from a copy"),
    ("ledger/round=0/{part}", lambda p: p.rename(p.with_name(p.name + ".damaged")),
     "is missing (its manifest entry says it was written)", "sample/0 is complete"),
])
def test_gapray_verify_names_each_damaged_file_and_its_fix(finished, capsys, rel, damage, what, fix):
    path = finished / rel.format(part=VerdictLedger(finished / "ledger").parts(0)[0].name)
    damage(path)
    code, out = verify(finished, capsys)
    assert code == 2 and len(out) == 1, out
    assert out[0].startswith(f"{path}: {what}") and fix in out[0], out[0]


def test_a_finished_run_resubmitted_with_a_damaged_file_says_so(finished, capsys):
    """Today the damage goes unnoticed (every phase is complete) and the job exits 0."""
    model = finished / "checkpoints" / "round=0" / "a" / "model" / "model.safetensors"
    truncate(model)
    truncate(VerdictLedger(finished / "ledger").parts(0)[1])
    before = tree_digest(finished)
    assert self_improve(ARGS + [f"run_dir={finished}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model) in err[0] and "train/0/a is complete" in err[0], err
    assert f"(and 1 more: `gapray verify {finished}` lists them)" in err[0]
    assert tree_digest(finished) == before


def test_a_part_moved_aside_is_drawn_again_with_the_same_rows(tmp_path):
    """The recovery recipe: the missing keys of a round are drawn again, with the same per-image seeds."""
    cfg = load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml",
                      ARGS + ["max_prompts=3", "batch_prompts=1", f"run_dir={tmp_path}"])
    backend = LocalBackend(cfg)
    prompts = load_prompts(cfg.prompts, limit=cfg.max_prompts)
    ledger = VerdictLedger(tmp_path / "ledger")
    key = lambda r: (r["prompt_id"], r["sample_idx"])  # noqa: E731
    assert backend.fill(prompts, ledger, 0, 2, seed=11, desc="sample/0") == 6
    before = sorted(ledger.read(0).to_pylist(), key=key)
    part = ledger.parts(0)[1]
    data = part.read_bytes()
    part.rename(part.with_name(part.name + ".damaged"))
    assert ledger.count(0) == 4
    assert backend.fill(prompts, ledger, 0, 2, seed=11, desc="sample/0") == 2  # only the part's rows
    assert sorted(ledger.read(0).to_pylist(), key=key) == before  # exactly the same rows
    assert part.read_bytes() == data  # the same part, byte for byte
    assert not verify_run_dir(tmp_path)[0]


def test_a_checkpoint_cut_short_in_an_unfinished_training_phase_is_a_note(finished, capsys):
    """A run killed while Ray Train wrote a checkpoint leaves it partial; Ray Train resumes from the last one it
    registered, so the resubmitted job goes on (it was refused: test_curriculum_ray's driver-kill test failed so)."""
    state = json.loads((finished / "state.json").read_text())
    completed = [p for p in state["completed"] if p not in ("train/0/a", "report") and not p.startswith(("measure/1", "replay", "train/0/b"))]
    RunState(completed=completed, current="train/0/a").save(finished)
    partial = finished / "checkpoints" / "round=0" / "a" / "checkpoints" / "checkpoint_000001"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    code, out = verify(finished, capsys)
    assert code == 0 and "intact" in out[0], out
    assert any(line.startswith("note: ") and "mp_rank_00_model_states.pt" in line and "interrupted checkpoint" in line
               for line in out), out
    from gapray.data.integrity import check_run_dir_integrity
    check_run_dir_integrity(finished)  # no UserError: the job resumes
    capsys.readouterr()
    # the same damage in a training phase that is complete is still refused
    RunState(completed=state["completed"], status="done").save(finished)
    code, out = verify(finished, capsys)
    assert code == 2 and "mp_rank_00_model_states.pt" in out[0] and not out[0].startswith("note"), out
