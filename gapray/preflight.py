"""Preflight: the setups a run can be seen to fail on before it starts, refused in one line (UserError, exit 2).

jobs/self_improve.py calls `check_self_improve` from load() and `gapray measure` calls `check_measure` at the
start of run_measure, before any phase runs: no Ray head is started and nothing in run_dir is written. In order:

  1. resources: a GPU asked for (model.device=cuda, serve.num_gpus > 0, train.scaling.use_gpu) where there is
     none, a replica or Train worker no node can hold, or more GPUs at once than there are (Serve keeps its
     replicas while training runs). Where: this machine (torch counts its GPUs) for backend=local and for the
     embedded Ray head; with RAY_ADDRESS the cluster's nodes (ray.nodes, ray.cluster_resources) plus the node
     types its autoscaler may add (GCS cluster config, or the cluster launcher's ~/ray_bootstrap_config.yaml).
     A cluster started by hand (`ray start`: the readonly autoscaler) has only its running nodes; an autoscaler
     whose node types cannot be read may add anything: nothing is refused then.
  2. a hub id with no preset loaded in float32 (the schema's default) onto a GPU: model.dtype=bfloat16, or an
     explicit model.dtype=float32 to keep it;
  3. train.backend=local with 16-bit weights: gapray/train/loop.py's local trainer steps torch's AdamW on the
     model's own parameters (prepare_model loads them in model.dtype; no float32 master copy), so small
     updates round away (bf16, lr 1e-5: 85% of N(0, 0.02) weights unchanged after 10 steps);
  4. a global batch (train.micro_batch_size x gradient_accumulation_steps x scaling.num_workers, the latter for
     train.backend=ray) larger than a round can yield: SFT rows <= prompts x images_per_prompt (every image
     accepted), DPO pairs <= prompts (one per prompt: its best accepted and worst rejected image,
     gapray/data/preference.py), none when images_per_prompt is 1;
  5. run_dir not creatable or not writable: the missing directories are made, a probe file written and
     removed, and whatever was made removed again; run_dir's filesystem without room for the run's
     checkpoints and exports (gapray.plan.run_dir_bytes); an embedded Ray head whose temp dir (RAY_TMPDIR,
     TMPDIR or /tmp) is on a filesystem past Ray's out-of-disk threshold, where it would refuse every object;
     on a cluster, a run_dir some live node does not see at the same path (a probe file read back by one task
     pinned on each node);
  6. a hub id not in the local cache that cannot be reached: offline (HF_HUB_OFFLINE), gated, misspelt, or no
     answer within 5 s (one HEAD request for its config.json; nothing is downloaded).

jobs/self_improve.py's check_self_improve asks first whether a GPU of the run can hold its share at all
(gapray/plan.py, what `gapray plan` prints): a training worker, Serve replica or judge actor whose estimate
exceeds cluster.gpu_memory_gb (null: this machine's CUDA device; neither: not checked) is refused, naming the
fixes that would fit (zero_stage, offload, workers, gradient checkpointing, serve.max_batch_size, more memory).

The checks are plain functions of (config, resources); only the cluster ones (`cluster_connection`,
`cluster_resources`, `check_run_dir_shared`) import Ray, and only when RAY_ADDRESS is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path

from gapray.config import (BUILTIN_MODELS, CONF_DIR, SHIPPED_MODELS, head_resources, judge_kind,
                           serve_released_for_training, worker_gpus)
from gapray.errors import UserError

HUB_TIMEOUT_S = 5.0
JUDGE_REPLICA_KEYS = ", judge.num_replicas, judge.autoscaling_config.min_replicas, judge.num_gpus"
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # the cluster launcher's copy of the cluster YAML, on the head


# ---- resources -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Resources:
    """What a run's work can be placed on."""
    where: str  # for the error line: "this machine", "the Ray cluster at RAY_ADDRESS=..."
    nodes: list[dict[str, float]]  # each running node's total resources ({"CPU": 8, "GPU": 1, ...})
    node_types: list[dict] = dataclasses.field(default_factory=list)  # the autoscaler's: name, resources,
    # max_count (-1: no limit)
    unknown: str = ""  # why the shape of what an autoscaler may add is unknown; non-empty: refuse nothing
    elastic_cpus: bool = False  # the embedded head: init_ray sizes its logical CPUs to the run

    def shapes(self) -> list[dict[str, float]]:
        """Every node shape a bundle could be placed on: running nodes and the node types that can be added."""
        return self.nodes + [t["resources"] for t in self.node_types if t["max_count"] != 0 and t["resources"]]

    def max_gpus(self) -> float:
        """GPUs there are, or could be with every node type at its max_count (an upper bound)."""
        gpus = [(t["resources"] or {}).get("GPU", 0) for t in self.node_types]
        grow = sum(math.inf if t["max_count"] < 0 and g else max(t["max_count"], 0) * g
                   for t, g in zip(self.node_types, gpus))
        return sum(n.get("GPU", 0) for n in self.nodes) + grow


def local_resources() -> Resources:
    """This machine: its CPUs and the GPUs torch sees (no Ray)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Resources(where=_this_machine(gpus), nodes=[{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}])


def _this_machine(gpus: float, *notes: str) -> str:
    notes += () if gpus else ("torch.cuda.is_available() is False",)
    return "this machine" + (f" ({'; '.join(notes)})" if notes else "")


def embedded_head(local: Resources, cfg) -> Resources:
    """The Ray a run starts here without RAY_ADDRESS: this machine. init_ray (backend=ray) sizes its logical CPUs
    to what the run places; Ray Train under backend=local starts a plain ray.init, which counts the cores."""
    where = _this_machine(local.max_gpus(), "the embedded Ray head: RAY_ADDRESS is not set")
    extra = head_resources(cfg)  # init_ray advertises the workers' custom resources on the head it starts
    return dataclasses.replace(local, where=where, elastic_cpus=cfg.backend == "ray",
                               nodes=[{**n, **extra} for n in local.nodes])


def ray_demands(cfg) -> list[tuple[str, dict[str, float], int]]:
    """What the run places through Ray: (what, in config keys; one bundle; how many it holds at all times)."""
    out = []
    if cfg.backend == "ray":
        s = cfg.serve
        a = s.autoscaling_config
        floor = s.num_replicas if a is None else a.min_replicas  # autoscaling may go down to min_replicas
        out.append((f"serve (serve.num_cpus={s.num_cpus:g}, serve.num_gpus={s.num_gpus:g} per replica)",
                    {"CPU": s.num_cpus, "GPU": s.num_gpus}, floor))
        if "judge" in cfg and judge_kind(cfg) == "vlm":  # its JudgeServer app (gapray/serve/judge.py)
            j = cfg.judge
            gpus = s.num_gpus if j.num_gpus is None else j.num_gpus
            ja = j.get("autoscaling_config")
            n, key = ((j.num_replicas, "judge.num_replicas") if ja is None
                      else (ja.min_replicas, "judge.autoscaling_config.min_replicas"))
            out.append((f"judge (JudgeServer: {key}={n}, judge.num_gpus={gpus:g} per replica)",
                        {"CPU": s.num_cpus, "GPU": gpus}, n))
    if "train" in cfg and cfg.train.backend == "ray":
        sc = cfg.train.scaling
        gpus = worker_gpus(sc)
        bundle = {"CPU": sc.cpus_per_worker, "GPU": gpus, **sc.resources}
        what = (f"training (train.scaling: {sc.num_workers} workers, cpus_per_worker={sc.cpus_per_worker:g}"
                f"{f', use_gpu={str(sc.use_gpu).lower()}: {gpus:g} GPU each' if gpus else ''}"
                f"{''.join(f', {k} {v:g}' for k, v in sc.resources.items())}")
        if sc.placement_strategy == "STRICT_PACK":  # every worker on one node: that node holds them all
            out.append((what + ", placement_strategy=STRICT_PACK: all on one node)",
                        {k: v * sc.num_workers for k, v in bundle.items()}, 1))
        else:
            out.append((what + ")", bundle, sc.num_workers))
    return out


def _fmt(resources: dict[str, float]) -> str:
    """CPUs, GPUs and custom resources (train.scaling.resources): not Ray's memory, node: or accelerator keys."""
    shown = {k: v for k, v in resources.items() if v and k not in ("memory", "object_store_memory")
             and not k.startswith(("node:", "accelerator_type:"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU"), kv[0]))) \
        or "nothing"


def check_resources(cfg, local: Resources, target: Resources) -> None:
    """Refuse what cannot be placed. `local`: this process's machine (backend=local loads the model here);
    `target`: where the Ray work goes (the embedded head, i.e. this machine, or the RAY_ADDRESS cluster)."""
    device = cfg.model.device
    if cfg.backend == "local" and device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        have = local.max_gpus()
        if have <= index:
            raise UserError(f"model.device={device}: {local.where} has {f'{have:g} GPU(s)' if have else 'no GPU'}; "
                            f"use model.device=cpu (or auto), or run where there is a GPU")
    demands = ray_demands(cfg)
    gpu_keys = [key for key, bundle, _ in demands if bundle["GPU"] > 0]
    if cfg.backend == "ray" and device.startswith("cuda"):
        gpu_keys.insert(0, f"model.device={device}")
    if target.unknown or not (demands or gpu_keys):
        return
    have = target.max_gpus()
    if gpu_keys and have == 0:
        types = f"; no node type of its autoscaler has one ({', '.join(t['name'] for t in target.node_types)})" \
            if target.node_types else ""
        raise UserError(f"{' and '.join(gpu_keys)} need{'s' if len(gpu_keys) == 1 else ''} GPUs, but {target.where} "
                        f"has none{types}: it would wait for them forever. Run on a GPU cluster (RAY_ADDRESS / "
                        f"`ray job submit`, cluster/README.md), or on CPUs: serve.num_gpus=0 "
                        f"train.scaling.use_gpu=false model.device=cpu")
    for key, bundle, _ in demands:
        need = {k: v for k, v in bundle.items() if v > 0 and not (k == "CPU" and target.elastic_cpus)}
        if need and not any(all(shape.get(k, 0) >= v for k, v in need.items()) for shape in target.shapes()):
            largest = ", ".join(f"[{_fmt(s)}]" for s in target.shapes()[:4])
            raise UserError(f"{key}: one asks for {_fmt(need)}, but no node of {target.where} can hold that "
                            f"(nodes and node types: {largest}); ask for less, or add such a node")
    training = sum(bundle["GPU"] * n for key, bundle, n in demands if key.startswith("training"))
    serving = sum(bundle["GPU"] * n for key, bundle, n in demands if not key.startswith("training"))
    released = serve_released_for_training(cfg)  # Serve's (and the judge's) GPUs go to the trainer while it trains
    held = max(serving, training) if released else serving + training
    if gpu_keys and held > have:
        parts = (" or " if released else " + ").join(f"{n} x {bundle['GPU']:g} for {key.split(' ')[0]}"
                                                     for key, bundle, n in demands if bundle["GPU"] > 0)
        trains = "train" in cfg
        why = ("the larger of Serve and training" if released else
               "Serve keeps its replicas while training runs" if trains else "every replica at once")
        raise UserError(f"the run holds {held:g} GPUs at once ({parts}: {why}), but "
                        f"{target.where} has at most {have:g}; lower {'train.scaling.num_workers or ' if trains else ''}"
                        f"the replicas (serve.num_replicas, serve.autoscaling_config.min_replicas"
                        f"{JUDGE_REPLICA_KEYS if any(k.startswith('judge') for k, _, _ in demands) else ''})"
                        f"{', or let the trainer take them: serve.release_for_training=always' if trains and not released else ''}")


@contextlib.contextmanager
def cluster_connection():
    """Connected to the RAY_ADDRESS cluster as a driver (no head is started) for the checks inside, then
    disconnected (init_ray connects again when the run starts); already connected: as it is."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(log_to_driver=False, logging_level="ERROR")  # RAY_ADDRESS, as init_ray connects
        except Exception as e:  # ConnectionError, or whatever an unreachable GCS raises
            raise UserError(f"RAY_ADDRESS={address}: cannot connect to that Ray cluster ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); start it, fix RAY_ADDRESS, or "
                            f"unset it to run on an embedded Ray here") from None
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_dir_seen(path: str, token: str) -> bool:
    """On one node (a task pinned there): does `path` hold the probe file with `token`?"""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_run_dir_shared(run_dir: str | Path, timeout_s: float = 60.0) -> None:
    """On a cluster (connected to RAY_ADDRESS): every live node sees run_dir at the same path, as the ledger,
    the driver's state and every Train worker's checkpoint shards need. The driver writes a probe file there
    with a random token; one task pinned on each node reads it back (no CPU asked: a full node answers too).
    Nodes the autoscaler adds later are not probed (cluster/README.md: mount the share on every node type)."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = Path(run_dir).resolve()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    token = secrets.token_hex(8)
    probe = path / f".gapray-shared-{token}"
    try:
        for d in reversed(missing):
            d.mkdir()
        probe.write_text(token)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        seen = ray.remote(num_cpus=0)(run_dir_seen)
        answers = ray.get([seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(str(probe), token) for n in nodes], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"run_dir '{run_dir}': not every node of the cluster answered the shared-storage probe within "
                        f"{timeout_s:g} s; check the nodes (`ray status`), or retry") from None
    finally:
        probe.unlink(missing_ok=True)
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
    blind = [n.get("NodeManagerAddress", n["NodeID"][:8]) for n, ok in zip(nodes, answers) if not ok]
    if blind:
        raise UserError(f"run_dir '{run_dir}' is not shared: {len(blind)} of {len(nodes)} nodes ({', '.join(blind)}) "
                        f"do not see it at {path}; mount the same storage there on every node (cluster/README.md, "
                        f"Storage), or choose a run_dir on it")


def cluster_resources() -> Resources:
    """The RAY_ADDRESS cluster: its live nodes and, if its autoscaler says, the node types it may add. Connects
    as a driver (no head is started) and disconnects; init_ray connects again when the run starts."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    with cluster_connection():
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        types, unknown = _autoscaler_node_types()
    return Resources(where=f"the Ray cluster at RAY_ADDRESS={address} ({len(nodes)} node(s): {_fmt(total)})",
                     nodes=nodes, node_types=types, unknown=unknown)


def _autoscaler_node_types() -> tuple[list[dict], str]:
    """(node types, why unknown): the autoscaler's node types, [] and "" if there is no autoscaler."""
    import json

    import ray._private.state
    from ray.experimental.internal_kv import _internal_kv_get

    try:  # the cluster config the autoscaler reports to the GCS (what Ray Data reads for its limits)
        config = ray._private.state.state.get_cluster_config()
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        return [{"name": g.name, "resources": {k: float(v) for k, v in g.resources.items()},
                 "max_count": int(g.max_count)} for g in config.node_group_configs], ""
    types = bootstrap_node_types(BOOTSTRAP_CONFIG.expanduser())
    if types is not None:
        return types, ("" if all(t["resources"] is not None for t in types) else
                       f"{BOOTSTRAP_CONFIG} has node types without `resources`")
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        if is_autoscaler_v2(fetch_from_server=True):
            return [], "its autoscaler (v2) does not report node types"
    except Exception:
        pass
    status = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS, by the monitor
    report = json.loads(status).get("autoscaler_report") if status else None
    if report is None:
        return [], "its autoscaler has not reported yet"
    if readonly(report):
        return [], ""  # a cluster started by hand: the running nodes are all there is
    return [], "its autoscaler does not report node types"


def readonly(report: dict) -> bool:
    """A v1 autoscaler report of the readonly provider (`ray start --head` without an autoscaling config): it
    adds no nodes, and names every node's type after the node (ray.autoscaler._private.util's
    format_readonly_node_type)."""
    mapping = report.get("node_type_mapping") or {}
    return bool(mapping) and all(t == f"node_{n}" for n, t in mapping.items())


def bootstrap_node_types(path: Path) -> list[dict] | None:
    """The cluster launcher's node types (available_node_types in the cluster YAML); None if no such file.
    A type without `resources` (left to autodetection) has resources None."""
    if not path.is_file():
        return None
    import yaml

    try:
        conf = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    head = conf.get("head_node_type")
    out = []
    for name, t in (conf.get("available_node_types") or {}).items():
        res = t.get("resources")
        workers = int(t.get("max_workers", conf.get("max_workers", 0) or 0))
        out.append({"name": name, "resources": None if res is None else {k: float(v) for k, v in res.items()},
                    "max_count": workers + (name == head)})
    return out


def target_resources(cfg, local: Resources) -> Resources:
    return cluster_resources() if os.environ.get("RAY_ADDRESS") else embedded_head(local, cfg)


# ---- the model ---------------------------------------------------------------------------------------------------
def is_hub_id(path: str) -> bool:
    return path not in BUILTIN_MODELS and path not in SHIPPED_MODELS and not Path(path).exists() and \
        re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None


def model_gpu_placement(cfg, local: Resources) -> str | None:
    """Where the model's weights go when that is a GPU (None: a CPU)."""
    device = cfg.model.device
    if cfg.backend == "local":
        if device.startswith("cuda"):
            return f"model.device={device}"
        return "this machine's GPU (model.device=auto)" if device == "auto" and local.max_gpus() > 0 else None
    if device.startswith("cuda"):
        return f"the Serve replicas' GPUs (model.device={device})"
    if device == "auto" and cfg.serve.num_gpus > 0:  # build_app: auto with num_gpus 0 is cpu
        return f"the Serve replicas' GPUs (serve.num_gpus={cfg.serve.num_gpus:g})"
    return None


def presets_for(path: str) -> list[str]:
    from omegaconf import OmegaConf

    return [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml")) if OmegaConf.load(p).get("path") == path]


def check_dtype(cfg, local: Resources, dtype_given: bool) -> None:
    m = cfg.model
    if dtype_given or m.dtype != "float32" or not is_hub_id(m.path):
        return
    where = model_gpu_placement(cfg, local)
    if where is None:
        return
    preset = presets_for(m.path)
    raise UserError(f"model.dtype: '{m.path}' is a hub id given without a preset, so it would load in float32 (the "
                    f"default) onto {where}: twice the memory of bfloat16. Pass model.dtype=bfloat16 (Janus-Pro's "
                    f"presets use it){f', or model={preset[0]} (its preset)' if preset else ''}, or "
                    f"model.dtype=float32 to keep float32")


def dtype_given(overrides=(), config_file: str | Path | None = None) -> bool:
    """Did the user set model.dtype (a key=value override, or a model mapping in the --config YAML)?"""
    if any(o.partition("=")[0].strip() == "model.dtype" for o in overrides):
        return True
    if config_file is not None and Path(config_file).is_file():
        import yaml

        try:
            model = (yaml.safe_load(Path(config_file).read_text()) or {}).get("model")
        except yaml.YAMLError:
            return False
        return isinstance(model, dict) and "dtype" in model
    return False


def check_hub(model, timeout_s: float = HUB_TIMEOUT_S, endpoint: str | None = None) -> None:
    """A hub id must be in the local cache, or answer within `timeout_s` (one HEAD of its config.json)."""
    from gapray.models.loading import check_model

    check_model(model)  # the cheap path checks first (directory, config.json, hub id syntax)
    path = model.path
    if not is_hub_id(path):
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HFValidationError, RepositoryNotFoundError

    head = f"model.path: could not load '{path}'"
    try:
        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return  # load_model reads the cache first (local_files_only)
    except HFValidationError as e:
        raise UserError(f"model.path: '{path}' is not a valid hub id ({str(e).splitlines()[0][:120]})") from None
    offline = constants.HF_HUB_OFFLINE or any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                                              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    fix = f"point model.path at a local save_pretrained directory, or download it where the hub is reachable " \
          f"(`hf download {path}`)"
    if offline:
        raise UserError(f"{head}: it is not in the local hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                        f"set; {fix}")
    url = hf_hub_url(path, "config.json", endpoint=endpoint)
    try:
        get_hf_file_metadata(url, timeout=timeout_s)
    except GatedRepoError:
        raise UserError(f"{head}: it is gated on the hub; accept its terms on its hub page and log in "
                        f"(`hf auth login` or HF_TOKEN), or {fix}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{head}: no such model on the hub (misspelt? a private one needs `hf auth login` or "
                        f"HF_TOKEN); presets: {', '.join(sorted(p.stem for p in (CONF_DIR / 'model').glob('*.yaml')))}"
                        ) from None
    except EntryNotFoundError:
        raise UserError(f"{head}: it has no config.json on the hub (not a transformers model)") from None
    except Exception as e:  # no network, DNS, a timeout, a proxy: the hub cannot be reached
        raise UserError(f"{head}: the hub ({url.split('/' + path)[0]}) could not be reached within {timeout_s:g} s "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); {fix}, or set "
                        f"HF_HUB_OFFLINE=1 once it is in the cache") from None


# ---- training data and precision ---------------------------------------------------------------------------------
def check_train_precision(cfg) -> None:
    t = cfg.train
    if t.backend != "local" or cfg.model.dtype == "float32":
        return
    raise UserError(f"train.backend=local with model.dtype={cfg.model.dtype}: the local trainer steps AdamW on the "
                    f"{cfg.model.dtype} weights themselves (no float32 master copy), so at optim.learning_rate="
                    f"{t.optim.learning_rate:g} most updates round to zero. Use model.dtype=float32, or "
                    f"train.backend=ray (DeepSpeed ZeRO, train.deepspeed.zero_stage >= 1, keeps float32 master weights)")


def check_batch(cfg, n_prompts: int) -> None:
    t = cfg.train
    workers = t.scaling.num_workers if t.backend == "ray" else 1
    batch = workers * t.micro_batch_size * t.gradient_accumulation_steps
    k = cfg.images_per_prompt
    if cfg.mode.endswith("dpo"):
        most = n_prompts if k >= 2 else 0
        why = (f"one DPO pair per prompt at most (its best accepted and worst rejected image): {n_prompts} prompts"
               if k >= 2 else "no DPO pairs: a pair needs two images of a prompt (images_per_prompt=1)")
    else:
        most = n_prompts * k
        why = f"{n_prompts} prompts x images_per_prompt {k} = {most} SFT rows at most (every image accepted)"
    if batch > most:
        raise UserError(f"train: one optimizer step needs {batch} rows ({workers} workers x micro_batch_size "
                        f"{t.micro_batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps}), but a "
                        f"round yields {why}, so train/0/a could not take a step; lower train.micro_batch_size, "
                        f"train.gradient_accumulation_steps or train.scaling.num_workers, or give more prompts "
                        f"(max_prompts, prompts) or images_per_prompt")


# ---- the run directory ---------------------------------------------------------------------------------------------
def check_run_dir(run_dir: str | Path) -> None:
    """run_dir can be made and written: make what is missing, write and remove a probe, remove what was made."""
    path = Path(run_dir).absolute()
    missing, p = [], path
    while not p.exists() and p != p.parent:  # exists() is False below a regular file too
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise UserError(f"run_dir '{run_dir}': {p} is a file, not a directory; choose a run_dir elsewhere "
                        f"(run_dir=PATH)")
    probe = path / f".gapray-preflight-{os.getpid()}"
    try:
        for d in reversed(missing):
            d.mkdir()
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run_dir '{run_dir}' cannot be written ({e.strerror or type(e).__name__}: "
                        f"{e.filename or path}); fix its permissions (or `chattr -i`), or choose another "
                        f"run_dir=PATH") from None
    finally:
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass


# ---- the entry points ----------------------------------------------------------------------------------------------
def check_space(cfg) -> None:
    """Refuse a run whose checkpoints and exported models (gapray.plan.run_dir_bytes) do not fit the free space of
    run_dir's filesystem, before it trains for hours and fails writing its last checkpoint. A model whose size is
    unknown here (a hub id neither cached nor known) is not checked."""
    import shutil

    from gapray.plan import GiB, model_arch, run_dir_bytes

    try:
        arch = model_arch(cfg.model.path)
    except Exception:  # a config.json this transformers cannot read: load_model will say so
        arch = None
    if arch is None:
        return
    need, how = run_dir_bytes(cfg, arch)
    where = Path(cfg.run_dir).resolve()
    while not where.exists():  # the nearest existing parent: run_dir may not be made yet
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise UserError(f"run_dir '{cfg.run_dir}': the run writes up to ~{need / GiB:.1f} GiB ({how}), but its "
                        f"filesystem ({where}) has {free / GiB:.1f} GiB free; free space, lower "
                        f"train.checkpoint.num_to_keep or rounds, or choose a run_dir on a larger volume")


def ray_temp_dir() -> Path:
    """Where a Ray head started here keeps its session, logs and spilled objects: Ray's own rule
    (ray._common.utils.get_default_system_temp_dir), restated so that the preflight does not import Ray."""
    if "RAY_TMPDIR" in os.environ:
        return Path(os.environ["RAY_TMPDIR"]) / "ray"
    return Path(os.environ.get("TMPDIR", "/tmp")) / "ray"


def check_temp_space(cfg) -> None:
    """Refuse a run that starts its own Ray head (a ray backend, no RAY_ADDRESS) on a temp filesystem used past
    Ray's out-of-disk threshold (RAY_local_fs_capacity_threshold, 0.95 by default): there Ray fails every object
    it creates (OutOfDiskError), which a run finds at its first phase. A cluster's nodes keep their own."""
    import shutil

    if os.environ.get("RAY_ADDRESS") or "ray" not in (cfg.backend, cfg.get("train", {}).get("backend")):
        return
    where = ray_temp_dir()
    while not where.exists():
        where = where.parent
    threshold = float(os.environ.get("RAY_local_fs_capacity_threshold", 0.95))
    usage = shutil.disk_usage(where)
    used = 1 - usage.free / usage.total if usage.total else 1.0
    if used >= threshold:
        raise UserError(f"Ray's temp dir '{ray_temp_dir()}' is on a filesystem {used:.0%} full ({where}, "
                        f"{usage.free / 2**30:.1f} GiB free) and Ray refuses to create objects past {threshold:.0%}: "
                        f"free space there, or set RAY_TMPDIR=PATH to a larger volume")


def check_self_improve(cfg, overrides=(), config_file: str | Path | None = None) -> None:
    """Everything jobs/self_improve.py can refuse before a phase runs; `overrides`/`config_file` tell whether
    model.dtype was given. The cheap checks first; a cluster (RAY_ADDRESS) is asked late: connecting takes seconds."""
    from gapray.prompts import load_prompts

    from gapray.plan import check_fits

    check_fits(cfg)  # pure arithmetic on the config: a run no GPU of that size can hold, wherever it runs
    local = local_resources()
    cluster = bool(os.environ.get("RAY_ADDRESS")) and "ray" in (cfg.backend, cfg.train.backend)
    if not cluster:
        check_resources(cfg, local, embedded_head(local, cfg))
    check_dtype(cfg, local, dtype_given(overrides, config_file))
    check_train_precision(cfg)
    check_batch(cfg, len(load_prompts(cfg.prompts, limit=cfg.max_prompts)))
    check_run_dir(cfg.run_dir)
    check_space(cfg)
    check_temp_space(cfg)
    if cluster:
        with cluster_connection():
            check_resources(cfg, local, cluster_resources())
            check_run_dir_shared(cfg.run_dir)
    check_hub(cfg.model)


def check_measure(cfg) -> None:
    """`gapray measure`'s share: resources, run_dir, the hub id (its model.dtype check needs the command line)."""
    local = local_resources()
    cluster = bool(os.environ.get("RAY_ADDRESS")) and cfg.backend == "ray"
    if not cluster:
        check_resources(cfg, local, embedded_head(local, cfg))
    check_run_dir(cfg.run_dir)
    check_temp_space(cfg)
    if cluster:
        with cluster_connection():
            check_resources(cfg, local, cluster_resources())
            check_run_dir_shared(cfg.run_dir)
    check_hub(cfg.model)
