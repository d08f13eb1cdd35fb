"""The Ray Data verdict pipeline: prompts -> images (Serve) -> self-verdicts (Serve) -> ledger -> preference data.

    prompt rows ──► SampleStage ──► ScoreStage ─────────────► driver (run_round: counts only;
    (PROMPT_ROW)    handle.sample   handle.score, then          measure_ray: the rows)
                    (SAMPLED rows)  ledger part-*.parquet

Both model stages are small actor pools that keep many requests in flight to the ModelServer replicas
(gapray/serve/server.py), where `@serve.batch` packs them into model batches; the stages themselves only
do bookkeeping. Execution is streaming: a batch of prompts is scored and written while later ones are
still being drawn, and the driver sees only counts (`run_round`), never the verdicts themselves.

What it guarantees
  - the same rows as `gapray measure backend=local`: per-image seeds (gapray.selfjudge.image_seed) make every
    image independent of batching, and the rows are built by gapray.selfjudge.verdict_rows;
  - exactly P x K ledger rows per round: the round draws only the keys the ledger lacks (a re-run of a
    finished round does nothing), and a request lost with a replica (killed, preempted) is sent again,
    with the same seeds, to whichever replica Serve has then;
  - every ledger row carries the policy_version that drew and judged it; a policy change in the middle
    of a round (a reload between sampling and scoring an image) stops the round instead of mixing policies.

`measure_ray` is `gapray measure backend=ray`; `run_round` is one self-improvement round.
Assumes a running Ray (started here on 127.0.0.1 when there is none) and, for `run_round`, a deployed
ModelServer app (gapray.serve.server.deploy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

# A Ray that gapray starts itself listens on 127.0.0.1 only (DESIGN.md). Ray reads this variable when it
# is imported, so it is set before the first `import ray`; never when attaching to a cluster (RAY_ADDRESS).
if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gapray.data.ledger import VerdictLedger  # noqa: E402
from gapray.data.preference import OUTPUTS, Reference, build_preference_data  # noqa: E402
from gapray.data.schemas import LEDGER_SCHEMA, PROMPT_ROW_SCHEMA, SAMPLED_SCHEMA  # noqa: E402
from gapray.selfjudge import image_seed, verdict_rows  # noqa: E402
from gapray.models import SampleOutput, SamplingParams, ScoreOutput  # noqa: E402
from gapray.prompts import Prompt  # noqa: E402
from gapray.serve.server import DEPLOYMENT, deploy, split_seeds  # noqa: E402

log = logging.getLogger(__name__)
# A request lost with its replica is safe to send again: images depend on their seeds only.
RETRIABLE = (ray.exceptions.RayActorError, serve.exceptions.BackPressureError,
             serve.exceptions.ReplicaUnavailableError, serve.exceptions.DeploymentUnavailableError)


COUNTED = ["prompt_id", "sample_idx", "verdict", "policy_version"]  # what run_round's driver sees of a verdict


class PolicyChangedError(RuntimeError):
    """An image was judged by other weights than drew it: Serve was reloaded in the middle of a round."""


def call_all(method, calls: list[tuple], retries: int) -> list:
    """`method.remote(*args)` for every args tuple at once (so that Serve can batch them), then the answers
    in order; a call that fails because its replica went away is sent again, up to `retries` times."""
    responses = [method.remote(*args) for args in calls]
    answers = []
    for args, response in zip(calls, responses):
        for attempt in range(retries + 1):
            try:
                answers.append(response.result())
                break
            except RETRIABLE as e:
                if attempt == retries:
                    raise
                log.warning("request lost with its replica (%s); sending it again (%d/%d)",
                            type(e).__name__, attempt + 1, retries)
                time.sleep(min(0.25 * 2 ** attempt, 4.0))  # give Serve time to start a replacement
                response = method.remote(*args)
    return answers


def prompt_rows(todo: list[tuple[Prompt, list[int]]]) -> pa.Table:
    """(prompt, sample indices to draw) pairs -> the pipeline's input table (PROMPT_ROW_SCHEMA)."""
    return pa.Table.from_pylist([{"prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt,
                                  "meta": json.dumps(p.meta) if p.meta is not None else None,
                                  "sample_idx": list(idx)} for p, idx in todo], schema=PROMPT_ROW_SCHEMA)


class SampleStage:
    """Prompt rows -> one SAMPLED row per image, drawn by the ModelServer replicas."""

    def __init__(self, app_name: str, sampling: dict, seed: int, max_rows: int, retries: int):
        self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name)
        self.sampling, self.params = sampling, SamplingParams(**sampling)
        self.seed, self.max_rows, self.retries = seed, max_rows, retries

    def __call__(self, batch: pa.Table) -> pa.Table:
        calls, owners = [], []
        for row in batch.to_pylist():
            seeds = {image_seed(self.seed, row["prompt_id"], j): j for j in row["sample_idx"]}
            # a request never exceeds one model batch (Serve refuses those), so big K is split
            for chunk in split_seeds(list(seeds), self.params, self.max_rows):
                calls.append((row["prompt"], chunk, self.sampling))
                owners.append((row, [seeds[s] for s in chunk]))
        out = []
        for (row, idx), answer in zip(owners, call_all(self.handle.sample, calls, self.retries)):
            for i, j in enumerate(idx):
                out.append({"prompt_id": row["prompt_id"], "task": row["task"], "prompt": row["prompt"],
                            "meta": row["meta"], "sample_idx": j, "seed": answer["seeds"][i],
                            "image_tokens": answer["tokens"][i], "token_logprobs": answer["logprobs"][i],
                            "policy_version": answer["policy_version"]})
        return pa.Table.from_pylist(out, schema=SAMPLED_SCHEMA)


class ScoreStage:
    """SAMPLED rows -> verdict rows (LEDGER_SCHEMA), judged by the ModelServer replicas, and by the external judge
    (`judge`: a judge section with its kind, gapray.judges.build_judge) here, on the pixels the replicas send back
    for the prompts it covers."""

    def __init__(self, app_name: str, mode: str, threshold: float, round: int, max_rows: int, retries: int,
                 ledger_root: str | None = None, judge: dict | None = None):
        from gapray.judges import build_judge

        self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name)
        self.judge = build_judge(OmegaConf.create({"judge": judge})) if judge else None
        self.mode, self.threshold, self.round = mode, threshold, round
        self.max_rows, self.retries = max_rows, retries
        # With a ledger, the actor stores each batch itself (no extra stage, no extra worker processes)
        # and passes on only what the driver counts.
        self.ledger = VerdictLedger(ledger_root) if ledger_root else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_prompt: dict[str, list[dict]] = {}
        for row in batch.to_pylist():
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        groups = [rows[i:i + self.max_rows] for rows in by_prompt.values() for i in range(0, len(rows), self.max_rows)]
        prompts = [Prompt(g[0]["prompt_id"], g[0]["task"], g[0]["prompt"],
                          json.loads(g[0]["meta"]) if g[0]["meta"] else None) for g in groups]
        calls = [(p.prompt, np.array([r["image_tokens"] for r in g], dtype=np.int64), self.mode,
                  self.judge is not None and self.judge.covers(p)) for p, g in zip(prompts, groups)]
        out = []
        for p, g, answer in zip(prompts, groups, call_all(self.handle.score, calls, self.retries)):
            drawn_by = {r["policy_version"] for r in g}
            if drawn_by != {answer["policy_version"]}:
                raise PolicyChangedError(f"prompt {p.prompt_id}: images drawn by policy {sorted(drawn_by)} were "
                                         f"judged by policy {answer['policy_version']}; reload Serve between rounds")
            sampled = SampleOutput(tokens=torch.tensor([r["image_tokens"] for r in g]),
                                   logprobs=torch.tensor([r["token_logprobs"] for r in g], dtype=torch.float32),
                                   seeds=[r["seed"] for r in g])
            judged = ScoreOutput(np.asarray(answer["p_aligned"], dtype=np.float64), answer["answers"])
            images = answer["images"] if answer["images"] is not None else [None] * len(g)
            rows = verdict_rows([p] * len(g), [r["sample_idx"] for r in g], sampled, images, judged, self.threshold,
                                self.judge)
            out += [{"round": self.round, **r, "policy_version": answer["policy_version"]} for r in rows]
        table = pa.Table.from_pylist(out, schema=LEDGER_SCHEMA)
        if self.ledger is None:
            return table
        self.ledger.write_part(self.round, table)
        return table.select(COUNTED)


def verdict_dataset(todo: list[tuple[Prompt, list[int]]], cfg, app_name: str, round: int = 0,
                    ledger_root: str | None = None, seed: int | None = None) -> ray.data.Dataset:
    """The lazy Ray Data plan from prompts to verdict rows (LEDGER_SCHEMA) through the Serve app `app_name`.

    `cfg` holds what `gapray measure` configures: seed, sampling, scoring, batch_prompts, serve, data
    (`seed` overrides cfg.seed). With `ledger_root` the rows go into the ledger as they are made and the
    dataset yields only COUNTED.
    """
    table = prompt_rows(todo)
    # one block per batch of prompts: blocks are what Ray Data hands to different actors
    blocks = [table.slice(i, cfg.batch_prompts) for i in range(0, table.num_rows, cfg.batch_prompts)]
    sampling = OmegaConf.to_container(cfg.sampling) if OmegaConf.is_config(cfg.sampling) else dict(cfg.sampling)
    ds = ray.data.from_arrow(blocks)
    ds.context.enable_progress_bars = False  # the callers show one bar in images; Ray Data's own flood job logs
    sampled = ds.map_batches(SampleStage, batch_size=cfg.batch_prompts, **_actor_pool(cfg),
                             fn_constructor_kwargs=dict(app_name=app_name, sampling=sampling,
                                                        seed=cfg.seed if seed is None else seed, **_requests(cfg)))
    return score_stage(sampled, cfg, app_name, round, ledger_root)


def score_stage(ds: ray.data.Dataset, cfg, app_name: str, round: int, ledger_root: str | None) -> ray.data.Dataset:
    """SAMPLED rows -> verdict rows, judged by the Serve app (an actor pool of ScoreStage) and the external judge,
    which each actor holds: a VLM judge's copy gets judge.num_gpus per actor."""
    judge = judge_spec(cfg)
    pool = _actor_pool(cfg)
    if judge and judge["kind"] == "vlm":
        gpus = cfg.serve.num_gpus if judge["num_gpus"] is None else judge["num_gpus"]
        if gpus > 0:
            pool["num_gpus"] = gpus
    return ds.map_batches(ScoreStage, batch_size=None, **pool,
                          fn_constructor_kwargs=dict(app_name=app_name, mode=cfg.scoring.mode,
                                                     threshold=cfg.scoring.threshold, round=round,
                                                     ledger_root=ledger_root, judge=judge, **_requests(cfg)))


def judge_spec(cfg) -> dict | None:
    """The run's judge section with its kind resolved (gapray.config.judge_kind), for the score actors to build;
    a config without a judge section: the shapes oracle, as before the section existed. None: no judge."""
    from gapray.config import JudgeConfig, judge_kind

    if "judge" not in cfg:
        return {**dataclasses.asdict(JudgeConfig()), "kind": "oracle"}
    kind = judge_kind(cfg)
    section = OmegaConf.to_container(cfg.judge) if OmegaConf.is_config(cfg.judge) else dict(cfg.judge)
    return None if kind == "none" else {**section, "kind": kind}


def _actor_pool(cfg) -> dict:
    """How every pipeline stage runs: data.concurrency actors, Arrow batches handed over without a copy."""
    return dict(compute=ray.data.ActorPoolStrategy(size=cfg.data.concurrency), num_cpus=cfg.data.num_cpus,
                batch_format="pyarrow", zero_copy_batch=True)


def _requests(cfg) -> dict:
    """How every stage calls Serve: at most serve.max_batch_size model rows per request, resent on a lost replica."""
    return dict(max_rows=cfg.serve.max_batch_size, retries=cfg.data.request_retries)


class _Meters:
    """ray.util.metrics for the dashboard: verdicts written and the running acceptance rate."""

    def __init__(self):
        from ray.util import metrics

        self.verdicts = metrics.Counter("gapray_verdicts", "verdict rows produced", tag_keys=("verdict",))
        self.acceptance = metrics.Gauge("gapray_acceptance_rate", "share of images the model accepts, this round")
        self.n = self.accepted = 0

    def update(self, verdicts: list) -> None:
        acc = sum(v == 1 for v in verdicts)
        self.n += len(verdicts)
        self.accepted += acc
        for tag, n in (("accepted", acc), ("rejected_or_unparsed", len(verdicts) - acc)):
            if n:
                self.verdicts.inc(n, tags={"verdict": tag})
        if self.n:
            self.acceptance.set(self.accepted / self.n)


def fill_ledger(cfg, prompts: list[Prompt], ledger: VerdictLedger, round: int, *, k: int, seed: int,
                app_name: str, desc: str = "") -> int:
    """Draw and judge the images the ledger's round still lacks (k per prompt, image_seed(seed, ...)) through
    the Serve app; returns the rows added. Afterwards the round holds exactly len(prompts) x k rows."""
    todo = ledger.missing(round, prompts, k)
    meters = _Meters()
    if todo:
        ds = verdict_dataset(todo, cfg, app_name, round, ledger_root=str(ledger.root), seed=seed)
        with tqdm(total=sum(len(idx) for _, idx in todo), unit="img", desc=desc or f"round {round}",
                  dynamic_ncols=True, mininterval=5) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                meters.update(batch.column("verdict").to_pylist())
                bar.update(batch.num_rows)
    expected, stored = len(prompts) * k, ledger.count(round)
    if stored != expected:
        raise RuntimeError(f"{ledger.root} round {round}: the ledger holds {stored} rows, expected {expected}")
    return meters.n


def rescore(cfg, rows: pa.Table, prompts: list[Prompt], ledger: VerdictLedger, round: int, *, app_name: str,
            policy_version: int) -> int:
    """Judge images drawn earlier (ledger rows of another round or ledger, for `prompts`) with the serving
    policy; the new verdicts go to `ledger` round `round`, keyed as the originals. Returns the rows added."""
    have = ledger.keys(round)
    keep = [(pid, j) not in have for pid, j in zip(rows.column("prompt_id").to_pylist(), rows.column("sample_idx").to_pylist())]
    rows = rows.filter(pa.array(keep, pa.bool_()))
    if rows.num_rows == 0:
        return 0
    meta = {p.prompt_id: json.dumps(p.meta) if p.meta is not None else None for p in prompts}
    sampled = pa.Table.from_pydict({
        **{name: rows.column(name) for name in ("prompt_id", "task", "prompt", "sample_idx", "seed", "image_tokens")},
        "meta": pa.array([meta[pid] for pid in rows.column("prompt_id").to_pylist()], pa.string()),
        "token_logprobs": pa.array([[x] for x in rows.column("logprob").to_pylist()], pa.list_(pa.float32())),
        "policy_version": pa.array([policy_version] * rows.num_rows, pa.int64()),  # the judge's: no policy check
    }).select(SAMPLED_SCHEMA.names).cast(SAMPLED_SCHEMA)
    blocks = [sampled.slice(i, 64) for i in range(0, sampled.num_rows, 64)]
    ds = ray.data.from_arrow(blocks)
    ds.context.enable_progress_bars = False
    ds = score_stage(ds, cfg, app_name, round, str(ledger.root))
    return sum(batch.num_rows for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def run_round(cfg, prompts: list[Prompt], run_dir: str | Path, round: int, app_name: str | None = None,
              reference: Reference | None = None) -> dict:
    """One round: K verdicts per prompt into the ledger (only the missing ones), then the round's
    SFT rows, DPO pairs and discard pool under data/round=R/. Returns counts.

    The ModelServer app `app_name` (default cfg.serve.app_name) must be running. With cfg.data.ref_logprobs
    and no `reference`, the DPO rows get reference log-probs from the same replicas. Images are drawn with
    image_seed(cfg.seed, prompt_id, sample_idx): give each round its own cfg.seed (e.g. derive_seed(seed,
    round)) unless it should redraw the same images.
    """
    run_dir = Path(run_dir)
    app_name = app_name or cfg.serve.app_name
    ledger = VerdictLedger(run_dir / "ledger")
    new_rows = fill_ledger(cfg, prompts, ledger, round, k=cfg.images_per_prompt, seed=cfg.seed, app_name=app_name)
    out_dir = run_dir / "data" / f"round={round}"
    if new_rows or not all((out_dir / f"{name}.parquet").exists() for name in OUTPUTS):
        if reference is None and cfg.data.ref_logprobs:
            reference = serve_reference(app_name, cfg.serve.max_batch_size, cfg.data.request_retries)
        build_preference_data(ledger, round, out_dir, min_margin=cfg.data.min_margin, reference=reference)
    counts = {name: pq.ParquetFile(out_dir / f"{name}.parquet").metadata.num_rows for name in OUTPUTS}
    return {"round": round, "rows": ledger.count(round), "new_rows": new_rows, **counts}


def serve_reference(app_name: str, max_rows: int, retries: int) -> Reference:
    """Reference log-probs from the ModelServer replicas (their current policy), `max_rows` images a call."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name)

    def reference(prompts: list[str], tokens: list[list[int]]) -> list[float]:
        calls = [(prompts[i:i + max_rows], np.array(tokens[i:i + max_rows], dtype=np.int64))
                 for i in range(0, len(prompts), max_rows)]
        return [x for a in call_all(handle.logprobs, calls, retries) for x in a["logprobs"]]
    return reference


def serve_reencode(app_name: str, max_rows: int, retries: int):
    """Image tokens -> the tokens of their decoded pictures (UnifiedModel.reencode) by the ModelServer replicas,
    `max_rows` images a request, all sent at once (spread over the replicas), a lost one sent again."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name)

    def reencode(tokens: list[list[int]]) -> list[list[int]]:
        calls = [(np.asarray(tokens[i:i + max_rows], dtype=np.int64),) for i in range(0, len(tokens), max_rows)]
        return [row for a in call_all(handle.reencode, calls, retries) for row in a["image_tokens"].tolist()]
    return reencode


def serve_decode(app_name: str):
    """Image tokens -> RGB arrays, decoded by a ModelServer replica (the grids of a run or a measure)."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name)
    return lambda tokens: handle.decode.remote(np.asarray(tokens)).result()["images"]


def init_ray(cfg, log_to_driver: bool = False) -> bool:
    """Attach to the running Ray, or start a local one bound to 127.0.0.1; True if started here.
    `log_to_driver`: show the output of Ray tasks and actors (a driver actor's progress) in this process."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit` / an existing cluster: its own settings
        ray.init(log_to_driver=log_to_driver)
        return True
    # A local instance listens on loopback only (DESIGN.md): Ray must have been imported with the variable
    # set (this module sets it), or it would bind its servers to the machine's network address.
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so a local Ray "
                           "would listen beyond 127.0.0.1: set it in the environment before starting Python")
    # Logical CPUs sized for what this run places, so replicas and Data actors never wait on each other.
    s = cfg.serve
    replicas = s.autoscaling_config.max_replicas if s.autoscaling_config is not None else s.num_replicas
    need = replicas * s.num_cpus + 2 * cfg.data.concurrency * cfg.data.num_cpus + 1
    if "train" in cfg:  # a self-improvement run also places Ray Train workers
        need += cfg.train.scaling.num_workers * cfg.train.scaling.cpus_per_worker
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    if ray.util.get_node_ip_address() != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError("Ray did not bind to 127.0.0.1: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                           "in the environment before starting Python")
    return True


def measure_ray(cfg, prompts: list[Prompt], write_outputs):
    """`gapray measure backend=ray`: the verdict rows of measure_local, computed by Serve + Ray Data.

    Deploys its own ModelServer app for cfg.model (handles only, no HTTP route), streams the verdicts
    back, calls `write_outputs(rows, decode)` while the app still serves (its replicas decode the grids'
    images: this process never loads the model), then removes the app (and the Ray instance, if it
    started one). Returns what write_outputs returned.
    """
    started = init_ray(cfg)
    app_name = f"{cfg.serve.app_name}-measure"
    deployed = False
    try:
        deploy(cfg.model, cfg.serve, name=app_name, route_prefix=None)
        deployed = True
        ds = verdict_dataset([(p, list(range(cfg.images_per_prompt))) for p in prompts], cfg, app_name)
        rows, meters = [], _Meters()
        with tqdm(total=len(prompts) * cfg.images_per_prompt, unit="img", desc="sample+score (ray)",
                  dynamic_ncols=True) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                meters.update(batch.column("verdict").to_pylist())
                rows += batch.drop_columns(["round", "policy_version"]).to_pylist()
                bar.update(batch.num_rows)
        order = {p.prompt_id: i for i, p in enumerate(prompts)}
        rows.sort(key=lambda r: (order[r["prompt_id"]], r["sample_idx"]))
        return write_outputs(rows, serve_decode(app_name))
    finally:
        if deployed:
            serve.delete(app_name)
        if started:
            ray.shutdown()
