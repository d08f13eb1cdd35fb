"""The curriculum driver: PAPER.md's Algorithms 1 and 2, and rounds beyond them, as resumable phases.

    measure/0 ─► round r = 0 .. rounds-1:
                   sample/r   N images per training prompt, judged by the model itself -> ledger/round=r,
                              then data/round=r/{sft,dpo,discard}.parquet (Algorithm 1)
                   gate/r     the external judge (gate.judge: the shapes oracle or a VLM, gapray/judges/) audits a
                              sample of the accepted images (its verdicts, in the ledger since sample/r);
                              precision below gate.min_precision stops the run (co-degradation), or with
                              gate.on_fail=warn is recorded and the run goes on
                   train/r/a  SFT or DPO on the round's data: all epochs, or (c-sft, c-dpo) up to replay_epoch;
                              the export is served as policy_version + 1
                   replay/r   (c- modes) the discard pool drawn and judged again by the current policy; prompts
                              with an accepted image are admitted: data/round=r/replay/, and
                              data/round=r/with_replay/ = the round's data + the admitted (Algorithm 2)
                   train/r/b  (c- modes) the remaining epochs on with_replay/, from train/r/a's export
                   measure/r+1
             ─► report: summary.json, report.md, plots/, grids/ (base vs final)

measure/i samples eval_images_per_prompt images per held-out prompt with the same seeds every time (base and
improved images are paired), and from i = 1 on also judges the base model's images with the current
policy: the understanding win rate (PAPER.md). Each training round draws with its own seed.

Resume: `state.json` in the run directory is rewritten (atomically) after every phase; a driver started on
the same run directory skips the completed phases and redoes the interrupted one, which never duplicates
data: the ledger draws only the images it lacks, preference files are rebuilt whole from the ledger, and
training resumes from its latest Ray Train checkpoint (train.backend=ray) or restarts (local), both
deterministic. Assumes the run directory is on storage every node sees (a cluster: NFS/EFS/Filestore).

Backends (gapray/backends/): `RayBackend` (Serve replicas sample and judge, Ray Data streams the verdicts; the
driver is a named actor, see jobs/self_improve.py) and `LocalBackend` (one process: the same phases on the model
in memory). Both write the same ledger rows for the same seeds; training runs as train.backend says.
corrupt_judge (mode flip/noise, rate) corrupts the verdicts the sample and replay phases build data from (and
the gate audits): poor supervision on purpose; the ledgers and every measure keep the model's own verdicts.
External judge: built once from config (gapray.judges.build_judge: judge.kind / gate.judge), it judges every image
the sample, replay and measure phases draw (the ledger's oracle_verdict, judge_model, judge_p); rescoring the base
images for the win rate asks only the policy again (the base images' external verdicts are already there).
With backend=ray the policy replicas judge with it where the images are (the oracle in the replica, a VLM in
its JudgeServer app: gapray/serve/judge.py). C-DPO's replay pairs are rebuilt from the replayed prompts' own
candidates (the paper does not say how).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from gapray.backends import build_backend
from gapray.config import SelfImproveConfig, TrainConfig, check_values, judge_kind, serve_released_for_training
from gapray.data.integrity import publish, read_table
from gapray.data.ledger import VerdictLedger
from gapray.data.preference import OUTPUTS, build_preference_data, corrupt_verdicts
from gapray.errors import UserError
from gapray.gauges import RunGauges
from gapray.selfjudge import summarize
from gapray.metrics import by_task, win_rate
from gapray.models.sampler import derive_seed
from gapray.prompts import Prompt, load_prompts
from gapray.rundir import RunDir


class GateStopped(RuntimeError):
    """The data-quality gate found too few of the accepted images right: the run stops (co-degradation)."""


def plan_phases(cfg) -> list[str]:
    """Every phase of a run, in order."""
    phases = ["measure/0"]
    for r in range(cfg.rounds):
        phases += [f"sample/{r}", f"gate/{r}", f"train/{r}/a"]
        if cfg.mode.startswith("c-"):
            phases += [f"replay/{r}", f"train/{r}/b"]
        phases.append(f"measure/{r + 1}")
    return phases + ["report"]


# The namespace of a run's named actors (driver, gauges): one for every job, so that a second `ray job submit` of a
# run finds the live driver (and refuses) and its gauges actor; an anonymous one per job would hide them.
ACTOR_NAMESPACE = "gapray"


def driver_name(run_dir: str | Path) -> str:
    """The named actor of a run directory: one driver per run at a time, wherever it was submitted from."""
    path = str(Path(run_dir).resolve())
    return f"gapray-driver-{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


@dataclasses.dataclass
class RunState:
    """What state.json holds: enough to resume, and the run's history for the report."""
    completed: list[str] = dataclasses.field(default_factory=list)
    current: str | None = None  # the phase in progress (or interrupted)
    status: str = "running"  # running | done | stopped (by the gate)
    message: str = ""
    policy_version: int = 0  # 0 = the base model; +1 per training phase
    checkpoint: str | None = None  # the serving policy's save_pretrained dir (None: cfg.model)
    discard_pool: list[str] = dataclasses.field(default_factory=list)  # prompt ids, after the latest sample/replay
    rounds: dict = dataclasses.field(default_factory=dict)  # "r" -> data counts, gate audit, train results
    evals: dict = dataclasses.field(default_factory=dict)  # "i" -> summary of measure/i
    seconds: dict = dataclasses.field(default_factory=dict)  # phase -> wall seconds

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = RunDir(run_dir).state
        if not path.is_file():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise UserError(f"run_dir: '{path}' is not a gapray state file ({e}); choose another run_dir") from None

    def save(self, run_dir: Path) -> None:
        path = RunDir(run_dir).state
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(tmp, path)  # atomic: a crash leaves the old state or the new, never half


# ---- the driver ----------------------------------------------------------------------------------------------
class CurriculumDriver:
    """Runs a self-improvement run's phases in order, persisting state after each. Plain Python: jobs/self_improve.py
    runs it in-process (backend=local) or as a named Ray actor (backend=ray)."""

    def __init__(self, cfg: dict | DictConfig):
        if OmegaConf.is_config(cfg) and OmegaConf.get_type(cfg) is SelfImproveConfig:
            self.cfg = cfg  # gapray.config.load_config typed and checked it (jobs/self_improve.py): as it is
        else:  # a plain mapping (tests, library callers): typed and checked here
            self.cfg = OmegaConf.merge(OmegaConf.structured(SelfImproveConfig), cfg)
            check_values(self.cfg)
        self.run_dir = Path(self.cfg.run_dir).resolve()
        self.paths = RunDir(self.run_dir)
        self.prompts = load_prompts(self.cfg.prompts, limit=self.cfg.max_prompts)
        self.eval_prompts = load_prompts(self.cfg.eval_prompts, limit=self.cfg.max_eval_prompts)
        self.composition_prompts = load_prompts(self.cfg.composition_prompts, limit=self.cfg.max_eval_prompts) \
            if self.cfg.composition_prompts else []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        check_resumable(self.run_dir, self.cfg)
        OmegaConf.save(self.cfg, self.paths.config, resolve=True)
        self.state = RunState.load(self.run_dir)
        self.backend = build_backend(self.cfg)
        self.gauges = RunGauges(self.run_dir.name, driver_name(self.run_dir).replace("-driver-", "-gauges-"),
                                namespace=ACTOR_NAMESPACE)

    # -- public --
    def run(self) -> dict:
        """Every phase not yet completed; returns the run summary. Raises GateStopped if the gate fires."""
        if self.state.status == "stopped":
            raise GateStopped(self.state.message)
        if self.state.completed:
            print(f"[gapray] {self.run_dir}: resuming after {len(self.state.completed)} completed phases "
                  f"({', '.join(self.state.completed)})", flush=True)
        self.backend.serve(self.state.checkpoint, self.state.policy_version)
        try:
            self._run_phases()
        finally:
            self.gauges.close()  # they stay exported a while longer, for the scrape after the last phase
        return json.loads(self.paths.summary.read_text())

    def _run_phases(self) -> None:
        for phase in plan_phases(self.cfg):
            if phase in self.state.completed:
                continue
            self.state.current = phase
            self.state.save(self.run_dir)
            print(f"[gapray] phase {phase} (policy_version {self.state.policy_version})", flush=True)
            t0 = time.perf_counter()
            kind, *args = phase.split("/")
            getattr(self, f"_{kind}")(*args)
            self.state.seconds[phase] = round(time.perf_counter() - t0, 1)
            self.state.completed.append(phase)
            self.state.current = None
            self.state.status = "done" if phase == "report" else "running"
            self.state.save(self.run_dir)
            self.gauges.set(policy_version=self.state.policy_version, phases_completed=len(self.state.completed))

    def status(self) -> dict:
        return dataclasses.asdict(self.state)

    # -- phases --
    def _measure(self, i: str) -> None:
        i = int(i)
        ledger = VerdictLedger(self.paths.eval_ledger())
        self.backend.fill(self.eval_prompts, ledger, i, self.cfg.eval_images_per_prompt, self.cfg.seed,
                          desc=f"measure/{i}")
        rows = _ordered(ledger.read(i), self.eval_prompts)
        summary = summarize(rows)
        if i > 0:  # the current policy's verdicts on the base model's images: the understanding win rate
            base = ledger.read(0)
            rescored = VerdictLedger(self.paths.rescore_ledger)
            self.backend.rescore(base, self.eval_prompts, rescored, i)
            now = {(r["prompt_id"], r["sample_idx"]): r["verdict"] for r in rescored.read(i).to_pylist()}
            paired = [{**r, "base_verdict": r["verdict"], "verdict": now[(r["prompt_id"], r["sample_idx"])]}
                      for r in _ordered(base, self.eval_prompts)]
            summary["win_rate"] = by_task(paired, win_rate)
        if self.composition_prompts:  # the stress test, drawn like the eval images and reported apart
            comp = VerdictLedger(self.paths.eval_ledger("composition"))
            self.backend.fill(self.composition_prompts, comp, i, self.cfg.eval_images_per_prompt, self.cfg.seed,
                              desc=f"measure/{i} composition")
            summary["composition"] = summarize(_ordered(comp.read(i), self.composition_prompts))
        summary["policy_version"] = self.state.policy_version
        self.state.evals[str(i)] = summary
        oracle = summary.get("oracle", {}).get("overall", {}).get("generation_accuracy", {})
        self.gauges.set(non_unification=summary["non_unification"], generation_accuracy=oracle.get("value"))

    def _sample(self, r: str) -> None:
        r = int(r)
        ledger = VerdictLedger(self.paths.ledger)
        self.backend.fill(self.prompts, ledger, r, self.cfg.images_per_prompt, derive_seed(self.cfg.seed, "round", r),
                          desc=f"sample/{r}")
        counts = build_preference_data(ledger, r, self.paths.data(r), min_margin=self.cfg.data.min_margin,
                                       verdicts=self._verdicts("sample", r), reencode=self._reencode(),
                                       reference=self._reference())
        self.state.discard_pool = _prompt_ids(self.paths.data(r) / "discard.parquet")
        self.state.rounds[str(r)] = {"start_checkpoint": self.state.checkpoint, "sample": counts}
        self.gauges.set(sft_samples=counts["sft"], dpo_pairs=counts["dpo"], discard_pool=counts["discard"])

    def _gate(self, r: str) -> None:
        r = int(r)
        audit = {"judge": self.cfg.gate.judge}
        if self.cfg.gate.judge != "none":  # the run's external judge (config.check_judge): its ledger verdicts
            t = VerdictLedger(self.paths.ledger).read(r, ["prompt_id", "sample_idx", "p_aligned", "verdict",
                                                                 "oracle_verdict"])
            corrupt = self._verdicts("sample", r)  # audit what training will see
            t = t if corrupt is None else corrupt(t)
            accepted = sorted((pid, j, o) for pid, j, v, o in zip(*(t.column(c).to_pylist() for c in
                                                                     ("prompt_id", "sample_idx", "verdict", "oracle_verdict")))
                              if v == 1 and o is not None)
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "audit", r) % 2**32)
            picked = [accepted[i] for i in rng.permutation(len(accepted))[:self.cfg.gate.audit_size]]
            right = sum(o == 1 for _, _, o in picked)
            audit["judge_model"] = self._judge_model()
            audit.update(audited=len(picked), right=right, precision=right / len(picked) if picked else None)
        self.state.rounds[str(r)]["gate"] = audit
        precision = audit.get("precision")
        self.gauges.set(gate_precision=precision)
        audit["fired"] = precision is not None and precision < self.cfg.gate.min_precision
        if not audit["fired"]:
            return
        message = (f"data-quality gate: round {r}: the external judge ({audit['judge_model']}) finds only "
                   f"{audit['right']} of {audit['audited']} audited accepted images right (precision {precision:.2f} < gate.min_precision "
                   f"{self.cfg.gate.min_precision}); training on these self-verdicts would teach the model its own "
                   f"mistakes (co-degradation). Inspect {VerdictLedger(self.paths.ledger).round_dir(r)}")
        if self.cfg.gate.on_fail == "warn":
            print(f"[gapray] WARNING (gate.on_fail=warn, training anyway): {message}", flush=True)
            return
        self.state.status, self.state.message = "stopped", message
        self.state.save(self.run_dir)
        raise GateStopped(message)

    def _train(self, r: str, part: str) -> None:
        r = int(r)
        c = self.cfg
        objective = "dpo" if c.mode.endswith("dpo") else "sft"
        replay_epoch = c.replay_epoch or c.train.epochs // 2
        epochs = c.train.epochs if not c.mode.startswith("c-") else (replay_epoch if part == "a" else c.train.epochs - replay_epoch)
        data = self.paths.data(r) if part == "a" else self.paths.with_replay(r)
        start = self.state.rounds[str(r)]["start_checkpoint"]  # the round's first policy: DPO's reference
        # part a's pairs carry that policy's log-probs (data.ref_logprobs): no frozen copy; with_replay's replay
        # pairs were drawn by part a's policy, so part b keeps the frozen copy of the round's first policy
        reference = "data" if part == "a" and self._reference_in_data() else "model"
        tcfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(c.train), {
            "model": {**OmegaConf.to_container(c.model), "path": self.state.checkpoint or c.model.path},
            "data": str(data), "objective": objective, "epochs": epochs,
            "seed": derive_seed(c.seed, "train", c.train.seed, r, part) % 2**31,
            "loss": {"reference": reference}, "reference_model": start or c.model.path,
            "run_dir": str(self.paths.train(r, part)),
            "overwrite": c.train.backend == "local",  # local training cannot resume: an interrupted one starts over
        })
        check_values(tcfg)
        from gapray.train import run_training

        if c.train.backend == "ray":  # no-op in the driver actor of backend=ray; a local driver starts its Ray here
            from gapray.backends.ray import init_ray
            init_ray(c)
        if serve_released_for_training(c):  # the trainer gets the replicas' GPUs; serve() below deploys again
            self.backend.release()
        result = run_training(tcfg)
        self.state.checkpoint = result.model_dir
        self.state.policy_version += 1
        self.state.rounds[str(r)][f"train_{part}"] = {"epochs": epochs, "steps": result.steps, "objective": objective,
                                                      "reference": reference if objective == "dpo" else None,
                                                      "metrics": {k: v for k, v in result.metrics.items()
                                                                  if isinstance(v, (int, float))}}
        self.gauges.set(train_loss=result.metrics.get("loss"))
        self.backend.serve(self.state.checkpoint, self.state.policy_version)

    def _replay(self, r: str) -> None:
        r = int(r)
        pool = set(self.state.discard_pool)
        prompts = [p for p in self.prompts if p.prompt_id in pool]
        ledger = VerdictLedger(self.paths.replay_ledger)
        self.backend.fill(prompts, ledger, r, self.cfg.images_per_prompt, derive_seed(self.cfg.seed, "replay", r),
                          desc=f"replay/{r}")
        counts = build_preference_data(ledger, r, self.paths.replay_data(r), min_margin=self.cfg.data.min_margin,
                                       verdicts=self._verdicts("replay", r), reencode=self._reencode())
        still = set(_prompt_ids(self.paths.replay_data(r) / "discard.parquet"))
        out = self.paths.with_replay(r)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("sft", "dpo"):
            table = pa.concat_tables([read_table(self.paths.data(r) / f"{name}.parquet"),
                                      read_table(self.paths.replay_data(r) / f"{name}.parquet")])
            tmp = out / f".{name}.parquet.tmp"
            pq.write_table(table.cast(OUTPUTS[name]), tmp)
            publish(tmp, out / f"{name}.parquet")
        self.state.rounds[str(r)]["replay"] = {**counts, "pool": len(pool), "admitted": len(pool - still)}
        self.state.discard_pool = sorted(still)
        self.gauges.set(replay_admitted=len(pool - still), discard_pool=len(still))

    def _judge_model(self) -> str:
        """What the report and messages call the external judge: "oracle" or the VLM's id or path."""
        return self.cfg.judge.model if judge_kind(self.cfg) == "vlm" else judge_kind(self.cfg)

    def _verdicts(self, phase: str, r: int):
        """The verdicts training data is built from: the model's own (None), or corrupted on purpose."""
        c = self.cfg.corrupt_judge
        if c.mode == "none":
            return None
        seed = derive_seed(self.cfg.seed, "corrupt", phase, r)
        return lambda table: corrupt_verdicts(table, c.mode, c.rate, seed, self.cfg.scoring.threshold)

    def _reference_in_data(self) -> bool:
        return bool(self.cfg.data.ref_logprobs) and self.cfg.mode.endswith("dpo")

    def _reference(self):
        """data.ref_logprobs with a DPO mode: a round's pairs carry the reference log-probs, computed while they
        are built by the policy that drew them, the round's first policy (DPO's reference), so its training
        (train/r/a) holds no frozen second model."""
        return self.backend.reference() if self._reference_in_data() else None

    def _reencode(self):
        """Training rows carry the decoded pictures' VQ tokens (data.reencode_images), by the serving model."""
        return self.backend.reencode if self.cfg.data.reencode_images else None

    def _report(self) -> None:
        from gapray.report import write_run_report
        write_run_report(self.run_dir, self.cfg, self.state, self.backend.decode,
                         {i: _ordered(VerdictLedger(self.paths.eval_ledger()).read(int(i)), self.eval_prompts)
                          for i in ("0", str(self.cfg.rounds))})


def _ordered(table: pa.Table, prompts: list[Prompt]) -> list[dict]:
    """Ledger rows in prompt-file order, then sample index: the same list whatever the part-file layout."""
    order = {p.prompt_id: i for i, p in enumerate(prompts)}
    return sorted(table.to_pylist(), key=lambda r: (order[r["prompt_id"]], r["sample_idx"]))


def _prompt_ids(path: Path) -> list[str]:
    return sorted(read_table(path, columns=["prompt_id"]).column("prompt_id").to_pylist())


# Keys that may change between a run and its resumption: they change how, not what, is computed.
RESUME_MAY_CHANGE = {"serve", "data", "run_dir", "grid_prompts", "batch_prompts", "cluster"}


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory resumes only the run it holds: refuse another configuration (one line naming the key)."""
    saved_path = RunDir(run_dir).config
    if not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    now = OmegaConf.to_container(cfg, resolve=True)
    # a section added to the schema after the run was saved (e.g. judge) had its default then
    defaults = OmegaConf.to_container(OmegaConf.structured(SelfImproveConfig))
    for key in sorted(set(saved) | set(now)):
        if key not in RESUME_MAY_CHANGE and saved.get(key, defaults.get(key)) != now.get(key):
            raise UserError(f"run_dir '{run_dir}' holds a run with another '{key}' ({saved.get(key)!r}, now "
                            f"{now.get(key)!r}); resume it with the same config, or choose another run_dir")
