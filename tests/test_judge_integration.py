"""The external judge end to end, backend=local: a tiny random Idefics3/SmolVLM judge (tests/test_vlm_judge.py's
builder), saved with save_pretrained and loaded by path through config (judge.model), judging the tiny Janus
policy's images in `gapray measure` and in jobs/self_improve.py: the summary's judge figures are hand counts of
the ledger rows, the gate audits through the judge and stops when it says 0, the ledger's judge columns are
filled, a resumed run does not judge again what it judged before; ledgers from before the judge columns still
read and verify."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from gapray.cli import main as gapray
from gapray.data.ledger import VerdictLedger
from gapray.judges import VLMJudge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vlm_judge import FAMILIES, PROMPTS, make_judge, script_answer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "conf/prompts/geneval_sample.jsonl"
N_PROMPTS, N, N_EVAL, K_EVAL = 4, 2, 3, 2
BASE_ARGS = ["model=tiny", "backend=local", "train.backend=local", f"max_prompts={N_PROMPTS}",
             f"images_per_prompt={N}", f"max_eval_prompts={N_EVAL}", f"eval_images_per_prompt={K_EVAL}",
             "train.epochs=1", "train.micro_batch_size=4", "batch_prompts=2", "mode=sft", "judge.dtype=float32",
             "judge.device=cpu", "gate.judge=vlm"]


def save_judge(judge: VLMJudge, path: Path) -> str:
    judge.model.save_pretrained(path)
    judge.processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def random_judge_dir(tmp_path_factory):
    """A random judge: its p spread over (0, 1), so it accepts some images and rejects others."""
    return save_judge(make_judge("idefics3", seed=0), tmp_path_factory.mktemp("judge_random"))


@pytest.fixture(scope="module")
def zero_judge_dir(tmp_path_factory):
    """A judge whose weights answer "The score is 0." to every verdict question, greedily (and P("0") ~ 1)."""
    judge = make_judge("idefics3", seed=0)
    last = judge.tokenizer.encode(judge.chat_text(PROMPTS[0], "generate"))[-1]  # the generation prompt's end
    script_answer(judge, last, FAMILIES["idefics3"].answer_start + "The score is 0.")
    return save_judge(judge, tmp_path_factory.mktemp("judge_zero"))


@pytest.fixture
def judge_calls(monkeypatch):
    """Every VLMJudge.judge call's image count (the judge itself runs unchanged)."""
    calls, original = [], VLMJudge.judge

    def counted(self, images, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(self, images, prompts, *args, **kwargs)

    monkeypatch.setattr(VLMJudge, "judge", counted)
    return calls


def self_improve(args) -> int:
    sys.path.insert(0, str(REPO / "jobs"))
    from self_improve import main
    return main(list(args))


def rate_by_hand(rows, pick, bad=0) -> tuple[int, int]:
    chosen = [r for r in rows if pick(r)]
    return sum(r["oracle_verdict"] == bad for r in chosen), len(chosen)


# ---- gapray measure ------------------------------------------------------------------------------------------
def test_measure_figures_come_from_the_vlm_judge(tmp_path, random_judge_dir, judge_calls):
    run_dir = tmp_path / "measure"
    # the random models' p values sit close together: thresholds in their middles, so that both the policy and
    # the judge accept some images and reject others (every figure has a denominator)
    assert gapray(["measure", "model=tiny", f"prompts={SAMPLE}", "max_prompts=4", "images_per_prompt=3",
                   "batch_prompts=4", f"run_dir={run_dir}", f"judge.model={random_judge_dir}", "judge.threshold=0.42",
                   "scoring.threshold=0.5295", "judge.dtype=float32", "judge.device=cpu", "judge.batch_size=5"]) == 0
    rows = pq.read_table(run_dir / "verdicts.parquet").to_pylist()
    assert len(rows) == 12 and judge_calls == [12]  # one judge call per batch of prompts (the judge batches by 5)
    # ledger columns: the judge's id, its p and the verdict it implies
    assert {r["judge_model"] for r in rows} == {random_judge_dir}
    assert all(0 <= r["judge_p"] <= 1 and r["oracle_verdict"] == int(r["judge_p"] >= 0.42) for r in rows)
    assert 0 < sum(r["oracle_verdict"] for r in rows) < len(rows)  # the judge accepts some, rejects others
    assert 0 < sum(r["verdict"] for r in rows) < len(rows)  # and so does the policy
    # the verdicts are the judge's on the decoded images: asked again directly, it says the same
    from gapray.models.loading import load_model
    policy = load_model(OmegaConf.create({"path": "tiny", "dtype": "float32", "device": "cpu"}))
    images = policy.decode(torch.tensor([r["image_tokens"] for r in rows]))
    direct = VLMJudge.from_pretrained(random_judge_dir, dtype="float32", device="cpu", local_files_only=True)
    assert direct.judge(images, [r["prompt"] for r in rows]).p_aligned == pytest.approx([r["judge_p"] for r in rows],
                                                                                        abs=1e-5)
    # summary.json: Gen., weak generation, false acceptance, overall and per task, as counted from the rows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["judge_model"] == random_judge_dir and summary["judge"]["kind"] == "vlm"
    for task, group in [("overall", rows)] + [(t, [r for r in rows if r["task"] == t]) for t in {r["task"] for r in rows}]:
        f = summary["oracle"]["overall"] if task == "overall" else summary["oracle"]["per_task"][task]
        gen = f["generation_accuracy"]
        assert (gen["k"], gen["n"]) == (sum(r["oracle_verdict"] == 1 for r in group), len(group))
        weak = f["weak_generation_rate"]
        assert (weak["k"], weak["n"]) == rate_by_hand(group, lambda r: r["verdict"] == 0)
        fa = f["false_acceptance_rate"]
        assert (fa["k"], fa["n"]) == rate_by_hand(group, lambda r: r["verdict"] == 1)
        und = f["understanding_accuracy"]
        assert und["k"] == sum(r["verdict"] == r["oracle_verdict"] for r in group)


@pytest.mark.parametrize("override, key", [
    ("judge.kind=vlm", "judge.model"),  # vlm without a model
    ("judge.model=/nonexistent/judge", "judge.model"),
    ("judge.mode=sample", "judge.mode"),
    ("judge.kind=llm", "judge.kind"),
    ("judge.threshold=2", "judge.threshold"),
])
def test_bad_judge_config_is_one_line_exit_2(tmp_path, capsys, override, key):
    run_dir = tmp_path / "bad"
    assert gapray(["measure", "model=tiny", f"run_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not run_dir.exists()


def test_a_judge_model_that_is_no_vlm_is_one_line_and_writes_nothing(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, eos_token_id=0, bos_token_id=0)
                    ).save_pretrained(tmp_path / "lm")
    capsys.readouterr()  # save_pretrained's progress bar
    run_dir = tmp_path / "run"
    assert gapray(["measure", "model=tiny", f"run_dir={run_dir}", f"judge.model={tmp_path / 'lm'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge.model" in err[0] and "image-text-to-text" in err[0], err
    assert not run_dir.exists()


def test_gate_judge_vlm_needs_a_model(tmp_path, capsys):
    assert self_improve([a for a in BASE_ARGS] + [f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge.model" in err[0] and "Qwen/Qwen2.5-VL-7B-Instruct" in err[0], err
    assert not (tmp_path / "run").exists()


# ---- jobs/self_improve.py backend=local -------------------------------------------------------------------------
def test_gate_stops_when_the_vlm_judge_rejects_the_accepted_images(tmp_path, capsys, zero_judge_dir, judge_calls):
    run_dir = tmp_path / "gated"
    # scoring.threshold=0: the policy accepts every image of its own, so the gate has images to audit
    args = BASE_ARGS + [f"judge.model={zero_judge_dir}", "judge.mode=generate", "scoring.threshold=0",
                        "gate.min_precision=0.5", f"run_dir={run_dir}"]
    assert self_improve(args) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jobs/self_improve.py")]
    assert len(err) == 1 and "data-quality gate" in err[0] and "precision 0.00" in err[0], err
    assert zero_judge_dir in err[0]  # the message names the judge
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and state["completed"] == ["measure/0", "sample/0"]
    gate = state["rounds"]["0"]["gate"]
    assert gate["judge"] == "vlm" and gate["judge_model"] == zero_judge_dir
    assert gate["audited"] == min(64, N_PROMPTS * N) and gate["right"] == 0
    rows = VerdictLedger(run_dir / "ledger").read(0).to_pylist()
    assert len(rows) == N_PROMPTS * N and all(r["verdict"] == 1 for r in rows)
    assert all(r["oracle_verdict"] == 0 and r["judge_p"] == 0.0 and r["judge_model"] == zero_judge_dir for r in rows)
    assert not (run_dir / "checkpoints").exists()  # nothing trained on the bad data
    assert sum(judge_calls) == N_EVAL * K_EVAL + N_PROMPTS * N  # measure/0 and sample/0, each image once
    judge_calls.clear()
    assert self_improve(args) == 3 and judge_calls == []  # resubmitted: stopped again, nothing judged again


def test_a_run_judged_by_the_vlm_resumes_without_judging_again(tmp_path, random_judge_dir, judge_calls, monkeypatch):
    """The judge fails on its fourth call (the second batch of sample/0; measure/0 made two); the resubmitted run
    judges only the images the ledger lacks, each once: every image is judged exactly once over the submissions."""
    run_dir = tmp_path / "run"
    args = BASE_ARGS + [f"judge.model={random_judge_dir}", "gate.min_precision=0", f"run_dir={run_dir}"]
    counted = VLMJudge.judge

    def failing(self, images, prompts, *a, **kw):
        if len(judge_calls) == 3:
            judge_calls.append(0)
            raise RuntimeError("judge replica lost")
        return counted(self, images, prompts, *a, **kw)

    monkeypatch.setattr(VLMJudge, "judge", failing)
    with pytest.raises(RuntimeError, match="judge replica lost"):
        self_improve(args)
    first = sum(judge_calls)
    judged_before = VerdictLedger(run_dir / "eval" / "ledger").count(0) + VerdictLedger(run_dir / "ledger").count(0)
    assert first == judged_before and 0 < VerdictLedger(run_dir / "ledger").count(0) < N_PROMPTS * N

    monkeypatch.setattr(VLMJudge, "judge", counted)
    judge_calls.clear()
    assert self_improve(args) == 0
    ledgers = {"eval 0": VerdictLedger(run_dir / "eval" / "ledger").read(0).to_pylist(),
               "sample 0": VerdictLedger(run_dir / "ledger").read(0).to_pylist(),
               "eval 1": VerdictLedger(run_dir / "eval" / "ledger").read(1).to_pylist()}
    total = sum(len(rows) for rows in ledgers.values())
    assert total == 2 * N_EVAL * K_EVAL + N_PROMPTS * N
    assert first + sum(judge_calls) == total  # nothing judged twice, nothing skipped
    # the ledger's judge columns, in every ledger the judge wrote
    for name, rows in ledgers.items():
        assert all(r["judge_model"] == random_judge_dir and 0 <= r["judge_p"] <= 1 for r in rows), name
        assert all(r["oracle_verdict"] == int(r["judge_p"] >= 0.5) for r in rows), name
    # the win rate's rescoring asks the policy only: the base images' judge verdicts are those of eval 0
    rescored = VerdictLedger(run_dir / "eval" / "rescore").read(1).to_pylist()
    assert len(rescored) == N_EVAL * K_EVAL and all(r["judge_model"] is None for r in rescored)

    # the gate audited through the judge: its precision is the judge's on the audited accepted images
    state = json.loads((run_dir / "state.json").read_text())
    gate = state["rounds"]["0"]["gate"]
    accepted = [r for r in ledgers["sample 0"] if r["verdict"] == 1]
    assert gate["judge_model"] == random_judge_dir and gate["audited"] == min(64, len(accepted)) > 0
    assert gate["right"] == sum(r["oracle_verdict"] == 1 for r in accepted)  # all audited (fewer than 64)
    # summary.json and report.md: the judge named, its figures from its verdicts
    from gapray.metrics import by_task, oracle_figures, win_rate
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["judge"] == {"kind": "vlm", "model": random_judge_dir}
    base, final = ledgers["eval 0"], ledgers["eval 1"]
    overall = summary["table"][-1]
    assert overall["gen_base"] == sum(r["oracle_verdict"] for r in base) / len(base)
    assert overall["weak_base"] == by_task(base, oracle_figures)["overall"]["weak_generation_rate"]["value"]
    assert overall["false_accept_final"] == by_task(final, oracle_figures)["overall"]["false_acceptance_rate"]["value"]
    now = {(r["prompt_id"], r["sample_idx"]): r["verdict"] for r in rescored}
    paired = [{**r, "base_verdict": r["verdict"], "verdict": now[(r["prompt_id"], r["sample_idx"])]} for r in base]
    assert summary["final"]["win_rate"]["overall"] == win_rate(paired)
    report = (run_dir / "report.md").read_text()
    assert f"Gen.: share of generations the external judge ({random_judge_dir}) accepts" in report
    assert "Weak gen. base" in report

    judge_calls.clear()
    assert self_improve(args) == 0 and judge_calls == []  # a finished run resubmitted judges nothing


def test_the_core_imports_no_world():
    """The world reaches the core and both backends only as an injected judge: gapray/judges/oracle.py (made by
    gapray.judges.build_judge) is the one module here that imports it, at module level or inside a function."""
    import ast

    def imports_world(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "gapray.world" or n.startswith("gapray.world.") for n in names):
                return True
        return False

    core = ["selfjudge.py", "measure.py", "curriculum.py", "metrics.py", "report.py", "judges/__init__.py",
            "judges/vlm.py", "backends/__init__.py", "backends/local.py", "backends/ray.py", "data/ledger.py",
            "data/preference.py", "serve/server.py", "diagnostics.py"]
    assert [m for m in core if imports_world(REPO / "gapray" / m)] == []
    assert imports_world(REPO / "gapray/judges/oracle.py")


# ---- older run directories --------------------------------------------------------------------------------------
def test_ledgers_written_before_the_judge_columns_read_and_verify(tmp_path):
    """A ledger part and a verdicts.parquet in the schema of before (no judge_model, judge_p), with manifest entries
    as gapray wrote them then: intact for `gapray verify`, read with the new columns null, summarised as the
    oracle's."""
    from gapray.data.integrity import parquet_problem, publish
    from gapray.data.schemas import LEDGER_SCHEMA, VERDICT_SCHEMA, without_judge_columns
    from gapray.selfjudge import summarize

    old_ledger = without_judge_columns(LEDGER_SCHEMA)
    assert "judge_model" not in old_ledger.names and "oracle_verdict" in old_ledger.names
    row = {"round": 0, "prompt_id": "p0", "task": "t", "prompt": "a circle", "sample_idx": 0, "seed": 1,
           "image_tokens": [1, 2], "logprob": -1.0, "p_aligned": 0.7, "verdict": 1, "answer": None,
           "oracle_verdict": 0, "policy_version": 0}
    part = tmp_path / "ledger" / "round=0" / "part-old.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=old_ledger), tmp_path / "tmp.parquet")
    publish(tmp_path / "tmp.parquet", part)
    verdicts = tmp_path / "verdicts.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k not in ("round", "policy_version")}],
                                        schema=without_judge_columns(VERDICT_SCHEMA)), tmp_path / "tmp.parquet")
    publish(tmp_path / "tmp.parquet", verdicts)
    assert parquet_problem(part) is None and parquet_problem(verdicts) is None
    rows = VerdictLedger(tmp_path / "ledger").read(0).to_pylist()
    assert rows[0]["judge_model"] is None and rows[0]["judge_p"] is None and rows[0]["oracle_verdict"] == 0
    assert summarize(rows)["judge_model"] == "oracle"
    # a foreign schema is still refused
    pq.write_table(pa.table({"x": [1]}), tmp_path / "tmp.parquet")
    foreign = tmp_path / "ledger" / "round=0" / "part-foreign.parquet"
    publish(tmp_path / "tmp.parquet", foreign)
    assert "another schema than LEDGER_SCHEMA" in parquet_problem(foreign)


def test_a_run_saved_before_the_judge_section_resumes(tmp_path):
    """config.yaml of a run from before the judge section: resumable with the section at its defaults, refused
    with another judge."""
    from gapray.config import CONF_DIR, SelfImproveConfig, load_config
    from gapray.curriculum import check_resumable
    from gapray.errors import UserError

    cfg = load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml", ["model=tiny"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["judge"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    check_resumable(tmp_path, cfg)
    other = load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml", ["model=tiny", "gate.judge=none",
                                                                           "judge.kind=none"])
    with pytest.raises(UserError, match="another 'gate'"):
        check_resumable(tmp_path, other)
