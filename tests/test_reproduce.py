"""jobs/reproduce.py in a reduced setting (2 seeds, few prompts and images, the shipped shapes model): every run
finishes, the table's means and stds are those of the runs' own summaries, the corrupted judge corrupts what it
should, the gate records what it saw, the diagnostic agrees with the measures at the checkpoints they share,
and running the job again changes nothing. The full setting's figures are in README (Results)."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gapray.data.ledger import VerdictLedger
from gapray.data.preference import build_preference_data, corrupt_verdicts

REPO = Path(__file__).resolve().parent.parent
SEEDS = (0, 1)
ARGS = [f"seeds=[{','.join(map(str, SEEDS))}]", "rounds=2", "diagnostic.train_samples=3", "diagnostic.heldout_samples=4",
        "corrupt_judge.rate=1.0",
        "run.max_prompts=24", "run.images_per_prompt=2", "run.max_eval_prompts=12", "run.eval_images_per_prompt=2",
        "run.train.epochs=2", "run.train.micro_batch_size=2", "run.batch_prompts=24"]


def reproduce(args):
    sys.path.insert(0, str(REPO / "jobs"))
    from reproduce import main
    return main(list(args))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reproduce") / "out"
    assert reproduce(ARGS + [f"out_dir={out_dir}"]) == 0
    return out_dir


def summary(out, seed, name):
    return json.loads((out / f"seed={seed}" / name / "summary.json").read_text())


def test_every_run_finishes_with_its_mode(out):
    for seed in SEEDS:
        for name, mode, rounds in (("sft", "sft", 1), ("c-sft", "c-sft", 2), ("dpo", "dpo", 1), ("c-dpo", "c-dpo", 1),
                                   ("corrupt", "c-sft", 1)):
            state = json.loads((out / f"seed={seed}" / name / "state.json").read_text())
            s = summary(out, seed, name)
            assert state["status"] == "done" and (s["mode"], s["rounds"], s["seed"]) == (mode, rounds, seed)
    for name in ("results.json", "results.md", "plots/rounds.png", "plots/diagnostic.png", "plots/gap_vs_gain.png"):
        assert (out / name).is_file(), name


def test_table_is_mean_and_std_of_the_runs(out):
    results = json.loads((out / "results.json").read_text())
    for method, name, i in (("base", "sft", "0"), ("sft", "sft", "1"), ("c-sft", "c-sft", "1"), ("c-dpo", "c-dpo", "1")):
        gens = [summary(out, s, name)["evals"][i]["oracle"]["overall"]["generation_accuracy"]["value"] for s in SEEDS]
        nons = [summary(out, s, name)["evals"][i]["non_unification"] for s in SEEDS]
        cell = results["table"][method]["overall"]
        assert cell["gen"]["mean"] == pytest.approx(np.mean(gens)) and cell["gen"]["std"] == pytest.approx(np.std(gens, ddof=1))
        assert cell["non"]["mean"] == pytest.approx(np.mean(nons))
    # the base is the same images in every run of a seed (paired measures)
    for s in SEEDS:
        assert len({json.dumps(summary(out, s, n)["evals"]["0"], sort_keys=True) for n in ("sft", "dpo", "corrupt")}) == 1
    wins = [summary(out, s, "sft")["evals"]["1"]["win_rate"]["overall"]["n"] for s in SEEDS]
    assert results["table"]["sft"]["overall"]["win_n"] == sum(wins)
    # the iterated rounds read the c-sft runs' measures 0..2
    gen2 = [summary(out, s, "c-sft")["evals"]["2"]["oracle"]["overall"]["generation_accuracy"]["value"] for s in SEEDS]
    assert results["rounds"]["2"]["gen"]["mean"] == pytest.approx(np.mean(gen2))
    assert "## Claims" in (out / "results.md").read_text()
    # the composition split (conf/reproduce.yaml measures it beside eval): its own table, from the same summaries
    comp = [summary(out, s, "c-sft")["evals"]["1"]["composition"]["oracle"]["overall"]["generation_accuracy"]["value"]
            for s in SEEDS]
    assert results["composition"]["c-sft"]["gen"]["mean"] == pytest.approx(np.mean(comp))
    assert "## Composition split" in (out / "results.md").read_text()


def test_corrupted_judge_trains_on_flipped_verdicts_and_the_gate_sees_them(out):
    for s in SEEDS:
        clean, bad = out / f"seed={s}" / "c-sft", out / f"seed={s}" / "corrupt"
        # same model, same seed: the same images and the same (true) verdicts in the ledger
        a, b = (VerdictLedger(d / "ledger").read(0).sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")])
                for d in (clean, bad))
        assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()
        # at rate 1.0 every image the model rejected is trained on, and none it accepted
        rejected = sum(v == 0 for v in a.column("verdict").to_pylist())
        assert pq.read_metadata(bad / "data" / "round=0" / "sft.parquet").num_rows == rejected
        gate = summary(out, s, "corrupt")["rounds_data"]["0"]["gate"]
        audited = [o for v, o in zip(a.column("verdict").to_pylist(), a.column("oracle_verdict").to_pylist()) if v == 0]
        assert len(audited) == gate["audited"] < 64  # fewer than gate.audit_size: every flipped accept audited
        assert gate["right"] == sum(audited) and gate["precision"] == pytest.approx(sum(audited) / len(audited))
        assert gate["fired"] == (gate["precision"] < 0.5)


def test_diagnostic_agrees_with_the_measures(out):
    for s in SEEDS:
        diag = json.loads((out / f"seed={s}" / "sft" / "diagnostic.json").read_text())
        assert [d["epoch"] for d in diag] == [0, 1, 2]
        base = summary(out, s, "sft")["evals"]["0"]["oracle"]["overall"]["understanding_accuracy"]
        # epoch 0 is the base model judging its own held-out images: the base measure's understanding accuracy
        assert diag[0]["und_acc"] == pytest.approx(base["value"])
        # the last epoch is the trained model judging the base images: the win-rate rescore's verdicts
        run = out / f"seed={s}" / "sft"
        rescored = VerdictLedger(run / "eval" / "rescore").read(1).to_pylist()
        # the external verdicts of those images are the base measure's (a rescore asks only the policy)
        judged = {(r["prompt_id"], r["sample_idx"]): r["oracle_verdict"]
                  for r in VerdictLedger(run / "eval" / "ledger").read(0).to_pylist()}
        assert diag[-1]["und_acc"] == pytest.approx(
            np.mean([r["verdict"] == judged[(r["prompt_id"], r["sample_idx"])] for r in rescored]))
        for d in diag:
            for kind in ("prompt", "verdict"):
                assert np.isfinite(d[kind]["inner"]) and -1 <= d[kind]["cosine"] <= 1
                assert d[kind]["n_train"] == 3


def test_running_again_changes_nothing(out):
    before = (out / "results.json").read_text()
    assert reproduce(ARGS + [f"out_dir={out}"]) == 0
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize("arg, key", [("seeds=[0,0]", "seeds"), ("modes=[sft,bogus]", "modes"),
                                      ("run.bogus=1", "bogus"), ("corrupt_judge.rate=2", "corrupt_judge.rate"),
                                      ("run.gate.judge=none", "run.gate.judge")])
def test_bad_input_is_one_line(arg, key, tmp_path, capsys):
    assert reproduce([arg, f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err
    assert not (tmp_path / "out").exists()


def test_corrupt_verdicts_is_seeded_per_image():
    n = 400
    t = pa.table({"prompt_id": [f"p{i // 4}" for i in range(n)], "sample_idx": [i % 4 for i in range(n)],
                  "p_aligned": np.linspace(0, 1, n), "verdict": pa.array([int(x >= 0.5) for x in np.linspace(0, 1, n)],
                                                                         pa.int8())})
    flipped = corrupt_verdicts(t, "flip", 0.3, seed=7)
    changed = [a != b for a, b in zip(t.column("verdict").to_pylist(), flipped.column("verdict").to_pylist())]
    assert 0.2 < np.mean(changed) < 0.4
    for a, b, c in zip(t.column("p_aligned").to_pylist(), flipped.column("p_aligned").to_pylist(), changed):
        assert b == pytest.approx(1 - a if c else a)
    # the same rows whatever the order: the choice hangs on (seed, prompt, sample) alone
    again = corrupt_verdicts(t.take(list(range(n))[::-1]), "flip", 0.3, seed=7)
    assert again.column("verdict").to_pylist()[::-1] == flipped.column("verdict").to_pylist()
    assert corrupt_verdicts(t, "flip", 0.3, seed=8).column("verdict").to_pylist() != flipped.column("verdict").to_pylist()
    noised = corrupt_verdicts(t, "noise", 1.0, seed=7)
    assert np.mean(noised.column("verdict").to_pylist()) == pytest.approx(0.5, abs=0.1)
    assert corrupt_verdicts(t, "none", 1.0, seed=7) is t
    unparsed = t.set_column(3, "verdict", pa.array([None] * n, pa.int8()))
    assert corrupt_verdicts(unparsed, "flip", 1.0, seed=7).column("verdict").null_count == n


def test_gate_warn_records_and_goes_on(tmp_path):
    """gate.on_fail=warn: the tiny model's verdicts fail the oracle audit, the run goes on and records it."""
    sys.path.insert(0, str(REPO / "jobs"))
    from self_improve import main
    run_dir = tmp_path / "run"
    args = ["model=tiny", "backend=local", "train.backend=local", "max_prompts=6", "images_per_prompt=3",
            "max_eval_prompts=2", "eval_images_per_prompt=1", "train.micro_batch_size=1", "mode=sft",
            "gate.on_fail=warn", f"run_dir={run_dir}"]
    assert main(args) == 0
    gate = json.loads((run_dir / "state.json").read_text())["rounds"]["0"]["gate"]
    assert gate["fired"] and gate["precision"] < 0.5
    # build_preference_data with the identity as `verdicts` writes what it writes without
    ledger = VerdictLedger(run_dir / "ledger")
    a = build_preference_data(ledger, 0, tmp_path / "a")
    b = build_preference_data(ledger, 0, tmp_path / "b", verdicts=lambda t: t)
    assert a == b
