"""backend=ray: Serve replicas draw and judge, Ray Data streams the verdicts into the ledger; `init_ray` starts
or joins the Ray every entry point uses.

The verdict pipeline: prompts -> one trip per image to Serve (sample, decode, self-verdict, external verdict)
-> ledger -> preference data.

    prompt rows ──► self_judge_block (Ray Data tasks) ──────► driver (run_round: counts only;
    (PROMPT_ROW)    handle.self_judge, then                    measure_ray: the rows)
                    ledger part-*.parquet

The stage is up to data.concurrency Ray Data tasks (gapray/backends/ray_stage.py, light to import) that keep
one request per prompt in flight to the ModelServer replicas (gapray/serve/server.py); a replica cuts each into
one piece per image, which `@serve.batch` packs into full model batches of the replica's size (fixed, or sized
by its memory: serve.max_batch_size=null), whatever the prompts and their numbers of images; it draws, decodes and
judges each image (with the external judge it was deployed with, gapray/serve/judge.py) and answers verdict
rows, so image tokens cross the network once and pixels never; the stage only stores them. Execution is
streaming: a batch of prompts is judged and written while later ones are still being drawn, and the driver
sees only counts (`run_round`), never the verdicts themselves. `rescore` (the win rate) is the same with
images drawn earlier (rescore_block, handle.rescore).

What it guarantees
  - the same rows as `gapray measure backend=local`: per-image seeds (gapray.models.sampler.image_seed) make
    every image independent of batching, and the replicas build the rows with the same core functions
    (gapray.selfjudge.sample_and_score_images, judge_samples);
  - exactly P x K ledger rows per round: the round draws only the keys the ledger lacks (a re-run of a
    finished round does nothing), and a request lost with a replica (killed, preempted) is sent again,
    with the same seeds, to whichever replica Serve has then;
  - every ledger row carries the policy_version that drew and judged it: one replica call does both, under
    the replica's lock, so a reload in the middle of a round can never mix policies within an image.

`measure_ray` is `gapray measure backend=ray`; `run_round` is one self-improvement round; `RayBackend` is what
the curriculum driver holds (gapray.backends: the interface it shares with LocalBackend).
Assumes a running Ray (started here on 127.0.0.1 when there is none) and, for `run_round`, a deployed
ModelServer app (gapray.serve.server.deploy).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

# A Ray that gapray starts itself listens on 127.0.0.1 only (DESIGN.md). Ray reads this variable when it
# is imported, so it is set before the first `import ray`; never when attaching to a cluster (RAY_ADDRESS).
if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gapray.backends.ray_stage import call_all, rescore_block, self_judge_block  # noqa: E402
from gapray.config import head_resources, judge_kind  # noqa: E402
from gapray.data.ledger import VerdictLedger  # noqa: E402
from gapray.data.preference import OUTPUTS, Reference, build_preference_data  # noqa: E402
from gapray.data.schemas import PROMPT_ROW_SCHEMA, RESCORE_ROW_SCHEMA  # noqa: E402
from gapray.models import SamplingParams  # noqa: E402
from gapray.prompts import Prompt  # noqa: E402
from gapray.rundir import RunDir  # noqa: E402
from gapray.serve.judge import deploy_judge, judge_spec  # noqa: E402
from gapray.serve.replica import DEPLOYMENT  # noqa: E402
from gapray.serve.server import deploy, rows_per_image  # noqa: E402


CALL_IMAGES = 64  # images per call where the driver cuts a list (reference log-probs, re-encoding): calls spread
# over the replicas, and each replica cuts a call into batches of its own size


def prompt_rows(todo: list[tuple[Prompt, list[int]]]) -> pa.Table:
    """(prompt, sample indices to draw) pairs -> the pipeline's input table (PROMPT_ROW_SCHEMA)."""
    return pa.Table.from_pylist([{"prompt_id": p.prompt_id, "task": p.task, "prompt": p.prompt,
                                  "meta": json.dumps(p.meta) if p.meta is not None else None,
                                  "sample_idx": list(idx)} for p, idx in todo], schema=PROMPT_ROW_SCHEMA)


def prompts_per_block(batch_prompts: int, tasks: int, images_per_prompt: int, replicas: int,
                      replica_images: int) -> int:
    """Prompts per pipeline block when the replicas size their batches by memory (serve.max_batch_size=null): the
    `tasks` pipeline tasks then keep twice what the replicas batch at once in flight (a batch queued behind each
    running one), `replicas` x `replica_images` images x 2, but never fewer than batch_prompts a block. Calls are
    cheap and tasks are processes (~365 MiB each), so it is the block that grows, not the number of tasks."""
    return max(batch_prompts, math.ceil(2 * replicas * replica_images / (tasks * max(1, images_per_prompt))))


def verdict_dataset(todo: list[tuple[Prompt, list[int]]], cfg, app_name: str, round: int = 0,
                    ledger_root: str | None = None, seed: int | None = None) -> ray.data.Dataset:
    """The lazy Ray Data plan from prompts to verdict rows (LEDGER_SCHEMA) through the Serve app `app_name`.

    `cfg` holds what `gapray measure` configures: seed, sampling, scoring, batch_prompts, serve, data
    (`seed` overrides cfg.seed). With `ledger_root` the rows go into the ledger as they are made and the
    dataset yields only COUNTED.
    """
    table = prompt_rows(todo)
    sampling = OmegaConf.to_container(cfg.sampling) if OmegaConf.is_config(cfg.sampling) else dict(cfg.sampling)
    per_block = cfg.batch_prompts
    if cfg.serve.max_batch_size is None and todo:  # replicas sized by memory: the in-flight work follows them
        s = cfg.serve
        rows = serve.get_deployment_handle(DEPLOYMENT, app_name).stats.remote().result()["max_batch_size"]
        per_block = prompts_per_block(cfg.batch_prompts, cfg.data.concurrency, max(len(idx) for _, idx in todo),
                                      s.autoscaling_config.max_replicas if s.autoscaling_config else s.num_replicas,
                                      rows // rows_per_image(SamplingParams(**sampling)))
    # one block per batch of prompts: blocks are what Ray Data hands to different tasks
    blocks = [table.slice(i, per_block) for i in range(0, table.num_rows, per_block)]
    ds = _dataset(blocks, cfg)
    return ds.map_batches(self_judge_block, batch_size=per_block, **_tasks(cfg), fn_kwargs=dict(
        app_name=app_name, sampling=sampling, seed=cfg.seed if seed is None else seed, mode=cfg.scoring.mode,
        threshold=cfg.scoring.threshold, round=round, ledger_root=ledger_root,
        retries=cfg.data.request_retries, log_level=cfg.serve.log_level))


def _tasks(cfg) -> dict:
    """How the pipeline stage runs: up to data.concurrency tasks at once (tasks, not an actor pool: Ray reuses
    its worker processes, where a pool would start new actors for every phase), each asking for the memory it
    holds (so that Ray Data's memory detector has nothing to warn about), Arrow batches without a copy."""
    return dict(compute=ray.data.TaskPoolStrategy(size=cfg.data.concurrency), num_cpus=cfg.data.num_cpus,
                memory=cfg.data.memory_mb * 2**20, batch_format="pyarrow", zero_copy_batch=True)


def _dataset(blocks: list[pa.Table], cfg) -> ray.data.Dataset:
    """The blocks as a dataset whose execution prints nothing unless data.verbose: the callers show one progress
    bar in images; Ray Data's own bars, plans and banners would flood the job log."""
    ds = ray.data.from_arrow(blocks)
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = bool(cfg.data.verbose)
    ds.context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.INFO if cfg.data.verbose else logging.WARNING)  # "finished in"
    return ds


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


def rescore(cfg, rows: pa.Table, prompts: list[Prompt], ledger: VerdictLedger, round: int, *, app_name: str) -> int:
    """Judge images drawn earlier (ledger rows of another round or ledger, for `prompts`) with the serving
    policy; the new verdicts go to `ledger` round `round`, keyed as the originals. Returns the rows added."""
    have = ledger.keys(round)
    keys = zip(rows.column("prompt_id").to_pylist(), rows.column("sample_idx").to_pylist())
    keep = [key not in have for key in keys]
    rows = rows.filter(pa.array(keep, pa.bool_()))
    if rows.num_rows == 0:
        return 0
    meta = {p.prompt_id: json.dumps(p.meta) if p.meta is not None else None for p in prompts}
    todo = pa.Table.from_pydict({
        **{name: rows.column(name) for name in ("prompt_id", "task", "prompt", "sample_idx", "seed", "image_tokens",
                                                "logprob")},
        "meta": pa.array([meta[pid] for pid in rows.column("prompt_id").to_pylist()], pa.string()),
    }).select(RESCORE_ROW_SCHEMA.names).cast(RESCORE_ROW_SCHEMA)
    blocks = [todo.slice(i, 64) for i in range(0, todo.num_rows, 64)]
    ds = _dataset(blocks, cfg)
    ds = ds.map_batches(rescore_block, batch_size=None, **_tasks(cfg), fn_kwargs=dict(
        app_name=app_name, mode=cfg.scoring.mode, threshold=cfg.scoring.threshold, round=round,
        ledger_root=str(ledger.root), retries=cfg.data.request_retries,
        log_level=cfg.serve.log_level))
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
    ledger = VerdictLedger(RunDir(run_dir).ledger)
    new_rows = fill_ledger(cfg, prompts, ledger, round, k=cfg.images_per_prompt, seed=cfg.seed, app_name=app_name)
    out_dir = RunDir(run_dir).data(round)
    if new_rows or not all((out_dir / f"{name}.parquet").exists() for name in OUTPUTS):
        if reference is None and cfg.data.ref_logprobs:
            reference = serve_reference(app_name, cfg.data.request_retries)
        build_preference_data(ledger, round, out_dir, min_margin=cfg.data.min_margin, reference=reference)
    counts = {name: pq.ParquetFile(out_dir / f"{name}.parquet").metadata.num_rows for name in OUTPUTS}
    return {"round": round, "rows": ledger.count(round), "new_rows": new_rows, **counts}


def serve_reference(app_name: str, retries: int, images_per_call: int = CALL_IMAGES) -> Reference:
    """Reference log-probs from the ModelServer replicas (their current policy), `images_per_call` images a call,
    all sent at once (spread over the replicas; each cuts a call into its own batches), a lost one sent again."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name)

    def reference(prompts: list[str], tokens: list[list[int]]) -> list[float]:
        n = images_per_call
        calls = [(prompts[i:i + n], np.array(tokens[i:i + n], dtype=np.int64)) for i in range(0, len(prompts), n)]
        return [x for a in call_all(handle.logprobs, calls, retries) for x in a["logprobs"]]
    return reference


def serve_reencode(app_name: str, retries: int, images_per_call: int = CALL_IMAGES):
    """Image tokens -> the tokens of their decoded pictures (UnifiedModel.reencode) by the ModelServer replicas, as
    serve_reference sends its calls."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name)

    def reencode(tokens: list[list[int]]) -> list[list[int]]:
        n = images_per_call
        calls = [(np.asarray(tokens[i:i + n], dtype=np.int64),) for i in range(0, len(tokens), n)]
        return [row for a in call_all(handle.reencode, calls, retries) for row in a["image_tokens"].tolist()]
    return reencode


def serve_decode(app_name: str):
    """Image tokens -> RGB arrays, decoded by a ModelServer replica (the grids of a run or a measure)."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name)
    return lambda tokens: handle.decode.remote(np.asarray(tokens)).result()["images"]


def init_ray(cfg=None, log_to_driver: bool = False) -> bool:
    """Join the Ray cluster of RAY_ADDRESS (`ray job submit`, a cluster head), or start a private local one bound
    to 127.0.0.1 (never whatever cluster another user started on this machine); True if started here. The one
    way every gapray entry point starts Ray (jobs/, bench/, gapray measure).

    `cfg` sizes a local instance's logical CPUs to what the run places (Serve replicas, pipeline tasks, Ray
    Train workers: a self-improvement, measure or train config), so that they never wait on each other;
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
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(placed_cpus(cfg))),
             resources=head_resources(cfg) if cfg is not None else None, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    if ray.util.get_node_ip_address() != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError("Ray did not bind to 127.0.0.1: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                           "in the environment before starting Python")
    return True


def placed_cpus(cfg) -> float:
    """The logical CPUs a run places at once: replicas (policy and VLM judge), pipeline tasks (twice over, for
    slack), Ray Train workers, the driver."""
    if cfg is None:
        return 1
    need = 1.0
    if "serve" in cfg:
        s = cfg.serve
        replicas = s.autoscaling_config.max_replicas if s.autoscaling_config is not None else s.num_replicas
        need += replicas * s.num_cpus
        if "judge" in cfg and judge_kind(cfg) == "vlm":  # its JudgeServer replicas take serve.num_cpus each
            j = cfg.judge
            judges = j.autoscaling_config.max_replicas if j.autoscaling_config is not None else j.num_replicas
            need += judges * s.num_cpus
    if "data" in cfg and not isinstance(cfg.data, str):  # a train config's `data` is its preference dir
        need += 2 * cfg.data.concurrency * cfg.data.num_cpus
    scaling = cfg.train.scaling if "train" in cfg else cfg.get("scaling")  # self-improvement run / train job
    if scaling is not None:
        need += scaling.num_workers * scaling.cpus_per_worker
    return need


def measure_ray(cfg, prompts: list[Prompt], write_outputs):
    """`gapray measure backend=ray`: the verdict rows of measure_local, computed by Serve + Ray Data.

    Deploys its own ModelServer app for cfg.model (handles only, no HTTP route), streams the verdicts
    back, calls `write_outputs(rows, decode)` while the app still serves (its replicas decode the grids'
    images: this process never loads the model), then removes the app (and the Ray instance, if it
    started one). Returns what write_outputs returned.
    """
    started = init_ray(cfg)
    app_name = f"{cfg.serve.app_name}-measure"
    deployed = []
    try:
        deployed.append(f"{app_name}-judge")
        judge = deploy_judge(judge_spec(cfg), cfg.serve, deployed[-1])
        deployed.append(app_name)
        deploy(cfg.model, cfg.serve, name=app_name, route_prefix=None, judge=judge)
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
        for name in reversed(deployed):
            serve.delete(name)  # a name never deployed: a no-op
        if started:
            ray.shutdown()


# ---- the backend the curriculum driver holds -----------------------------------------------------------------
class RayBackend:
    """Serve replicas (one ModelServer app) sample and judge; Ray Data streams verdicts into the ledger."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.app = cfg.serve.app_name
        self.judge_app = f"{self.app}-judge"  # a VLM judge's JudgeServer app (gapray/serve/judge.py)
        self.policy_version = 0

    def serve(self, checkpoint: str | None, policy_version: int) -> None:
        # deploy() of a running app with the same model and judge only changes user_config: reconfigure() on the
        # live replicas, no restart (on resume: a no-op when Serve already serves this policy)
        judge = deploy_judge(judge_spec(self.cfg), self.cfg.serve, self.judge_app)
        deploy(self.cfg.model, self.cfg.serve, name=self.app, checkpoint=checkpoint, policy_version=policy_version,
               judge=judge)
        self.policy_version = policy_version

    def release(self) -> None:
        """Delete the apps (their replicas and the GPUs they hold) until serve() deploys them again."""
        serve.delete(self.app)  # returns once the replicas are gone and their resources are free
        serve.delete(self.judge_app)

    def fill(self, prompts: list[Prompt], ledger: VerdictLedger, round: int, k: int, seed: int, desc: str) -> int:
        return fill_ledger(self.cfg, prompts, ledger, round, k=k, seed=seed, app_name=self.app, desc=desc)

    def rescore(self, rows: pa.Table, prompts: list[Prompt], ledger: VerdictLedger, round: int) -> int:
        return rescore(self.cfg, rows, prompts, ledger, round, app_name=self.app)

    def decode(self, tokens):
        return serve_decode(self.app)(tokens)

    def reencode(self, tokens: list[list[int]]) -> list[list[int]]:
        return serve_reencode(self.app, self.cfg.data.request_retries)(tokens)

    def reference(self):
        return serve_reference(self.app, self.cfg.data.request_retries)
