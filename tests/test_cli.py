"""`gapray COMMAND`: the recipes of jobs/ run by name, with their own arguments, errors and exit codes."""

from gapray.cli import JOBS, JOBS_DIR, main


def test_every_job_has_its_subcommand():
    assert {f.stem for f in JOBS_DIR.glob("*.py")} - {j for j, _ in JOBS.values()} == {"measure", "probe_sft"}
    assert all((JOBS_DIR / f"{j}.py").is_file() for j, _ in JOBS.values())


def test_a_subcommand_is_its_job(tmp_path, capsys):
    """The job's own argument checks answer (one line, exit 2, nothing written): the arguments reached it."""
    assert main(["run", "mode=bogus", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "jobs/self_improve.py: error: config key 'mode': 'bogus' is not one of sft, dpo, c-sft, c-dpo"
    assert main(["pretrain-world", "lm_steps=-5", f"out_dir={tmp_path / 'model'}"]) == 2
    assert capsys.readouterr().err.strip() == "pretrain_world: error: config key 'lm_steps': must be >= 0, got -5"
    assert main(["pretrain-world", "own_positive_share=1.5", f"out_dir={tmp_path / 'model'}"]) == 2
    assert capsys.readouterr().err.strip() == ("pretrain_world: error: config key 'own_positive_share': must be "
                                               "between 0 and 1 (or null: the natural share), got 1.5")
    assert not (tmp_path / "run").exists() and not (tmp_path / "model").exists()
