"""gapray/preflight.py: setups a run would fail on (or wait forever on) refused in one line, exit code 2, before any
phase: no Ray head started, nothing in run_dir written. The checks are plain functions of (config, resources),
tested here with resource dicts; a few end-to-end calls of jobs/self_improve.py's and gapray measure's main."""

import http.server
import socket
import sys
import threading
from pathlib import Path

import pytest

from gapray import preflight
from gapray.config import CONF_DIR, SelfImproveConfig, head_resources, load_config
from gapray.errors import UserError
from gapray.preflight import Resources

REPO = Path(__file__).resolve().parent.parent
CPU_ONLY = Resources("this machine", [{"CPU": 2.0, "GPU": 0.0}])
FAST = ["max_eval_prompts=2", "eval_images_per_prompt=1"]  # what a run would do first, kept small
LOCAL = ["model=tiny", "backend=local", "train.backend=local", "max_prompts=4", "images_per_prompt=2",
         "train.micro_batch_size=2", "gate.min_precision=0", *FAST]


def cfg(*overrides):
    return load_config(SelfImproveConfig, CONF_DIR / "self_improve.yaml", list(overrides))


def machine(gpus: int, cpus: int = 16) -> Resources:
    """The embedded head a run starts here: it advertises the presets' gapray_train too (head_resources)."""
    return Resources("this machine", [{"CPU": float(cpus), "GPU": float(gpus), "gapray_train": 64.0}], elastic_cpus=True)


def refused(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- 1. resources ------------------------------------------------------------------------------------------------
def test_gpus_asked_for_on_a_machine_without_any_are_refused():
    c = cfg("experiment=janus-pro-1b")  # serve.num_gpus=1, train.scaling.use_gpu=true
    msg = refused(preflight.check_resources, c, CPU_ONLY, preflight.embedded_head(CPU_ONLY, c))
    assert "serve.num_gpus=1" in msg and "use_gpu=true" in msg and "has none" in msg
    assert "RAY_ADDRESS is not set" in msg and "serve.num_gpus=0 train.scaling.use_gpu=false" in msg
    preflight.check_resources(c, CPU_ONLY, machine(8))  # 1 replica + 4 workers fit on 8 GPUs
    preflight.check_resources(cfg(), CPU_ONLY, preflight.embedded_head(CPU_ONLY, cfg()))  # shapes on CPU: fine


def test_model_device_cuda_needs_a_gpu_here():
    c = cfg("model=tiny", "backend=local", "model.device=cuda")
    assert "model.device=cuda: this machine" in refused(preflight.check_resources, c, CPU_ONLY, CPU_ONLY)
    c1 = cfg("model=tiny", "backend=local", "model.device=cuda:1")
    assert "has 1 GPU(s)" in refused(preflight.check_resources, c1, machine(1), machine(1))
    preflight.check_resources(c1, machine(2), machine(2))
    ray_cuda = cfg("model=tiny", "model.device=cuda")  # backend=ray: the replicas would put it on cuda
    assert "model.device=cuda needs GPUs" in refused(preflight.check_resources, ray_cuda, CPU_ONLY,
                                                      preflight.embedded_head(CPU_ONLY, ray_cuda))


def test_a_cluster_is_judged_by_its_nodes_and_its_autoscalers_node_types():
    c = cfg("experiment=janus-pro-1b")
    head = {"CPU": 8.0, "GPU": 0.0, "memory": 3e10}
    cpu_cluster = Resources("the Ray cluster at RAY_ADDRESS=x", [head],
                            [{"name": "cpu_worker", "resources": {"CPU": 16.0}, "max_count": 4}])
    msg = refused(preflight.check_resources, c, CPU_ONLY, cpu_cluster)
    assert "the Ray cluster at RAY_ADDRESS=x has none" in msg and "cpu_worker" in msg
    gpu_types = [{"name": "gpu_serve", "resources": {"CPU": 8.0, "GPU": 1.0}, "max_count": 8},
                 {"name": "gpu_train", "resources": {"CPU": 48.0, "GPU": 4.0, "gapray_train": 4.0}, "max_count": 1}]
    preflight.check_resources(c, CPU_ONLY, Resources("c", [head], gpu_types))  # none running yet, all addable
    preflight.check_resources(c, CPU_ONLY, Resources("c", [head], [], unknown="no node types reported"))
    # CPUs count on a cluster: a 16-CPU Train worker fits on no node
    big = cfg("experiment=janus-pro-1b", "train.scaling.cpus_per_worker=16")
    assert "no node of c can hold that" in refused(preflight.check_resources, big, CPU_ONLY,
                                                   Resources("c", [head], gpu_types[:1]))
    assert "no node" in refused(preflight.check_resources, big, CPU_ONLY, Resources("c", [head, {"CPU": 8, "GPU": 8}]))


def test_train_workers_go_only_where_their_resources_and_placement_fit():
    """The presets' workers reserve gapray_train, which only the training node types advertise: a cluster of
    1-GPU serving nodes alone is refused, naming it; STRICT_PACK puts every worker on one node, which must hold
    them all (8 x 1 GPU: not a 4-GPU node)."""
    head = {"CPU": 8.0, "GPU": 0.0}
    serving = {"name": "gpu_serve", "resources": {"CPU": 8.0, "GPU": 1.0}, "max_count": 16}
    train4 = {"name": "gpu_train", "resources": {"CPU": 48.0, "GPU": 4.0, "gapray_train": 4.0}, "max_count": 2}
    train8 = {"name": "gpu_train8", "resources": {"CPU": 192.0, "GPU": 8.0, "gapray_train": 8.0}, "max_count": 1}
    seven = cfg("experiment=janus-pro-7b")
    msg = refused(preflight.check_resources, seven, CPU_ONLY, Resources("c", [head], [serving]))
    assert msg.startswith("training (train.scaling: 8 workers, cpus_per_worker=4, use_gpu=true: 1 GPU each, "
                          "gapray_train 1): one asks for CPU 4, GPU 1, gapray_train 1, but no node of c")
    preflight.check_resources(seven, CPU_ONLY, Resources("c", [head], [serving, train4]))  # PACK: over 2 nodes
    packed = cfg("experiment=janus-pro-7b", "train.scaling.placement_strategy=STRICT_PACK")
    assert "one asks for CPU 32, GPU 8, gapray_train 8" in refused(preflight.check_resources, packed, CPU_ONLY,
                                                                    Resources("c", [head], [serving, train4]))
    preflight.check_resources(packed, CPU_ONLY, Resources("c", [head], [serving, train8]))
    # one machine without RAY_ADDRESS: the head init_ray starts advertises what the workers reserve
    assert head_resources(seven) == {"gapray_train": 8.0} and head_resources(cfg()) == {}
    eight = Resources("this machine", [{"CPU": 64.0, "GPU": 8.0}])
    preflight.check_resources(seven, CPU_ONLY, preflight.embedded_head(eight, seven))
    assert "gapray_train" in refused(preflight.check_resources, seven, CPU_ONLY, eight)
    with pytest.raises(UserError, match="train.scaling.placement_strategy"):
        cfg("train.scaling.placement_strategy=TIGHT")
    with pytest.raises(UserError, match="train.scaling.resources"):
        cfg("train.scaling.resources={GPU: 1}")


def test_replicas_and_train_workers_hold_their_gpus_at_once_unless_serve_is_released():
    # 1 replica x 1 GPU + the VLM judge's JudgeServer replica x 1 GPU + 4 workers x 1
    kept = cfg("experiment=janus-pro-1b", "serve.release_for_training=never")
    msg = refused(preflight.check_resources, kept, CPU_ONLY, machine(5))
    assert "holds 6 GPUs at once" in msg and "has at most 5" in msg and "serve.release_for_training=always" in msg
    preflight.check_resources(kept, CPU_ONLY, machine(6))
    preflight.check_resources(cfg("experiment=janus-pro-1b", "serve.release_for_training=never",
                                  "serve.autoscaling_config.min_replicas=0"),
                              CPU_ONLY, machine(5))  # policy replicas may scale to zero while training runs
    # the default (auto): the driver deletes the GPU replicas before training, so the larger side must fit
    released = cfg("experiment=janus-pro-1b")
    preflight.check_resources(released, CPU_ONLY, machine(4))
    msg = refused(preflight.check_resources, released, CPU_ONLY, machine(3))
    assert "holds 4 GPUs at once" in msg and "the larger of Serve and training" in msg


def test_a_vlm_judges_jobserver_replicas_hold_gpus_beside_the_policy_replicas():
    """judge.kind=vlm on the Ray path: its JudgeServer app's replicas (judge.num_replicas x judge.num_gpus) are
    counted with Serve's, and released with them for training."""
    from gapray.config import MeasureConfig

    def measure(*overrides):
        return load_config(MeasureConfig, CONF_DIR / "measure.yaml", ["model=tiny", "backend=ray", "serve.num_gpus=1",
                                                                      "judge.model=Qwen/Qwen2.5-VL-7B-Instruct",
                                                                      *overrides])

    msg = refused(preflight.check_resources, measure("judge.num_replicas=2", "judge.num_gpus=0.5"), CPU_ONLY, machine(1))
    assert "holds 2 GPUs at once" in msg and "2 x 0.5 for judge" in msg and "judge.num_replicas" in msg
    preflight.check_resources(measure("judge.num_replicas=2", "judge.num_gpus=0.5"), CPU_ONLY, machine(2))
    # autoscaled: the judge holds its min_replicas at all times (num_replicas is ignored then)
    auto = measure("judge.num_replicas=5", "judge.autoscaling_config.min_replicas=2", "judge.autoscaling_config.max_replicas=4")
    assert "1 x 1 for serve + 2 x 1 for judge" in refused(preflight.check_resources, auto, CPU_ONLY, machine(2))
    preflight.check_resources(auto, CPU_ONLY, machine(3))
    with pytest.raises(UserError, match="judge.autoscaling_config"):
        measure("judge.autoscaling_config.min_replicas=3", "judge.autoscaling_config.max_replicas=2")
    # with training: Serve and the judge give their GPUs to the trainer, so serving (1 + 2) vs training (4) counts
    kept = cfg("experiment=janus-pro-7b", "train.scaling.num_workers=2", "judge.num_replicas=2")
    preflight.check_resources(kept, CPU_ONLY, machine(3))
    assert "holds 4 GPUs at once" in refused(preflight.check_resources,
                                             cfg("experiment=janus-pro-7b", "train.scaling.num_workers=2",
                                                 "judge.num_replicas=3"), CPU_ONLY, machine(3))


def test_a_measure_on_gpu_replicas_has_no_trainer_to_release_serve_for():
    from gapray.config import MeasureConfig

    def measure(*overrides):
        return load_config(MeasureConfig, CONF_DIR / "measure.yaml", ["model=tiny", "backend=ray", *overrides])

    preflight.check_resources(measure("serve.num_gpus=1"), CPU_ONLY, machine(1))
    msg = refused(preflight.check_resources, measure("serve.num_gpus=1", "serve.num_replicas=2"), CPU_ONLY, machine(1))
    assert "holds 2 GPUs at once" in msg and "has at most 1" in msg


def test_a_hand_started_cluster_is_told_from_an_autoscaling_one():
    """`ray start --head` runs a v1 autoscaler on the readonly provider, which adds nothing and names each node's
    type after the node (seen on a local head, Ray 2.60); a real one names its node types."""
    node = "89cbbcdf" * 7
    assert preflight.readonly({"node_type_mapping": {node: f"node_{node}"}, "legacy": True})
    assert not preflight.readonly({"node_type_mapping": {node: "gpu_serve"}})
    assert not preflight.readonly({})


@pytest.mark.parametrize("yaml_name", ["aws.yaml", "gcp.yaml"])
def test_the_shipped_cluster_yamls_node_types_fit_the_janus_presets(yaml_name):
    types = preflight.bootstrap_node_types(REPO / "cluster" / yaml_name)
    assert types and all(t["resources"] is not None for t in types)
    head = [dict(t["resources"]) for t in types if t["resources"].get("GPU", 0) == 0][:1]
    for experiment in ("janus-pro-1b", "janus-pro-7b"):
        preflight.check_resources(cfg(f"experiment={experiment}"), CPU_ONLY, Resources(yaml_name, head, types))
    assert preflight.bootstrap_node_types(REPO / "cluster" / "no-such.yaml") is None


# ---- 2. a hub id in float32 on a GPU ----------------------------------------------------------------------------
def test_a_hub_id_without_preset_is_not_loaded_in_float32_onto_a_gpu():
    # not the preset: dtype float32 (and device cpu, from conf/self_improve.yaml's shapes preset, unless set)
    c = cfg("model=deepseek-community/Janus-Pro-1B", "model.device=auto", "serve.num_gpus=1")
    msg = refused(preflight.check_dtype, c, CPU_ONLY, False)
    assert "model.dtype=bfloat16" in msg and "model=janus-pro-1b" in msg and "serve.num_gpus=1" in msg
    preflight.check_dtype(c, CPU_ONLY, preflight.dtype_given(["model.dtype=float32"]))  # asked for: kept
    preflight.check_dtype(cfg("model=janus-pro-1b", "serve.num_gpus=1"), CPU_ONLY, False)  # the preset: bfloat16
    preflight.check_dtype(cfg("model=deepseek-community/Janus-Pro-1B"), CPU_ONLY, False)  # CPU replicas
    local = cfg("model=someorg/SomeJanus", "model.device=auto", "backend=local")
    preflight.check_dtype(local, CPU_ONLY, False)
    assert "this machine's GPU" in refused(preflight.check_dtype, local, machine(1), False)


def test_dtype_given_reads_overrides_and_the_config_file(tmp_path):
    assert not preflight.dtype_given(["model=org/x", "model.device=cuda"], CONF_DIR / "self_improve.yaml")
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  path: org/x\n  dtype: float32\n")
    assert preflight.dtype_given([], y)


# ---- 3. 16-bit weights in the local trainer ----------------------------------------------------------------------
def test_local_training_of_16bit_weights_is_refused():
    c = cfg("model=janus-pro-1b", "train.backend=local")
    msg = refused(preflight.check_train_precision, c)
    assert "model.dtype=bfloat16" in msg and "no float32 master copy" in msg
    assert "model.dtype=float32" in msg and "train.backend=ray" in msg
    assert "float16" in refused(preflight.check_train_precision, cfg("model=tiny", "model.dtype=float16",
                                                                     "train.backend=local"))
    preflight.check_train_precision(cfg("model=janus-pro-1b", "train.backend=local", "model.dtype=float32"))
    preflight.check_train_precision(cfg("model=janus-pro-1b"))  # train.backend=ray: DeepSpeed's master weights
    # what it guards against: torch's AdamW on bf16 weights at lr 1e-5 leaves most of them unchanged
    import torch

    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(10_000) * 0.02).to(torch.bfloat16))
    w0 = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0)
    for _ in range(10):
        w.grad = torch.randn_like(w)
        opt.step()
    assert (w.detach() == w0).float().mean() > 0.5


# ---- 4. a global batch a round cannot fill ----------------------------------------------------------------------
def test_a_global_batch_larger_than_a_round_can_yield_is_refused():
    c = cfg("experiment=janus-pro-1b")  # 4 workers x 4 x 4 = 64 rows; the 6 sample prompts x 10 images = 60
    msg = refused(preflight.check_batch, c, 6)
    assert "needs 64 rows" in msg and "6 prompts x images_per_prompt 10" in msg
    preflight.check_batch(c, 7)
    dpo = cfg("model=tiny", "mode=dpo", "train.scaling.num_workers=2", "train.micro_batch_size=2")  # 4 pairs
    assert "one DPO pair per prompt" in refused(preflight.check_batch, dpo, 3)
    preflight.check_batch(dpo, 4)
    one = cfg("model=tiny", "mode=dpo", "images_per_prompt=1", "train.backend=local", "train.micro_batch_size=1")
    assert "no DPO pairs" in refused(preflight.check_batch, one, 100)


# ---- 5. run_dir --------------------------------------------------------------------------------------------------
def test_run_dir_below_a_file_or_in_an_immutable_dir_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert f"{f} is a file" in refused(preflight.check_run_dir, f / "run")
    assert "is a file" in refused(preflight.check_run_dir, f)
    preflight.check_run_dir(tmp_path / "a" / "b" / "c")  # creatable: made, probed, and removed again
    assert list(tmp_path.iterdir()) == [f]
    # a directory no file can be made in, on every Linux and without root (chattr +i needs root): /proc
    assert "cannot be written" in refused(preflight.check_run_dir, "/proc/self")
    assert "cannot be written" in refused(preflight.check_run_dir, "/proc/self/run/deeper")


# ---- 6. the hub ---------------------------------------------------------------------------------------------------
def model(path):
    return cfg(f"model={path}").model


def test_a_hub_id_not_in_the_cache_is_refused_at_once_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = refused(preflight.check_hub, model("nobody/no-such-model-gapray"))
    assert "could not load 'nobody/no-such-model-gapray'" in msg and "HF_HUB_OFFLINE" in msg
    preflight.check_hub(model("tiny"))  # not a hub id: nothing asked


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def serve_http(handler_cls):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """HEAD <repo>/resolve/main/config.json as the hub answers it."""
    def do_HEAD(self):
        repo = self.path.split("/resolve/")[0].strip("/")
        code, headers = {"org/gated": (401, {"X-Error-Code": "GatedRepo"}),
                         "org/there": (200, {"ETag": '"abc"', "X-Repo-Commit": "0" * 40, "Content-Length": "2"}),
                         "org/noconfig": (404, {"X-Error-Code": "EntryNotFound"})}.get(
            repo, (404, {"X-Error-Code": "RepoNotFound"}))
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_answers_become_one_line(online):
    server, url = serve_http(FakeHub)
    try:
        preflight.check_hub(model("org/there"), endpoint=url)
        assert "no such model on the hub" in refused(preflight.check_hub, model("org/misspelt"), 5, url)
        assert "gated" in refused(preflight.check_hub, model("org/gated"), 5, url)
        assert "no config.json" in refused(preflight.check_hub, model("org/noconfig"), 5, url)
    finally:
        server.shutdown()


def test_an_unreachable_hub_is_one_line_not_a_hang(online):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    msg = refused(preflight.check_hub, model("nobody/bogus"), 5, closed)
    assert "could not load 'nobody/bogus'" in msg and "could not be reached within 5 s" in msg
    silent = socket.socket()  # accepts connections, never answers: the timeout decides
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        msg = refused(preflight.check_hub, model("nobody/bogus"), 0.5, f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert "within 0.5 s" in msg
    finally:
        silent.close()


# ---- end to end: jobs/self_improve.py and gapray measure --------------------------------------------------------
def self_improve(args):
    sys.path.insert(0, str(REPO / "jobs"))
    from self_improve import main
    return main(list(args))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_janus_on_a_machine_without_gpus_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    """Before: the embedded head started and the job waited forever on 'No available node types can fulfill
    resource request {'GPU': 1.0, 'CPU': 2.0}'."""
    import torch

    import gapray.backends.ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPUs, wherever this runs

    def no_ray(*args, **kwargs):
        raise AssertionError("a Ray head was started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(gapray.backends.ray, "init_ray", no_ray)
    run_dir = tmp_path / "run"
    assert self_improve(["experiment=janus-pro-1b", f"run_dir={run_dir}"]) == 2
    line = one_line(capsys)
    assert line.startswith("jobs/self_improve.py: error: ") and "need GPUs" in line and "serve.num_gpus=1" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, needle", [
    (["model.device=cuda"], "model.device=cuda: this machine"),
    (["train.micro_batch_size=16"], "one optimizer step needs 16 rows"),  # 4 prompts x 2 images: 8 rows at most
    (["model=nobody/bogus-model-gapray"], "could not load 'nobody/bogus-model-gapray'"),  # offline: conftest
])
def test_bad_setups_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, overrides, needle):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # model.device=cuda: refused wherever this runs
    run_dir = tmp_path / "run"
    assert self_improve(LOCAL + [f"run_dir={run_dir}"] + overrides) == 2
    line = one_line(capsys)
    assert needle in line, line
    assert not run_dir.exists()


def test_a_run_dir_below_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    assert self_improve(LOCAL + [f"run_dir={f / 'run'}"]) == 2
    assert f"{f} is a file, not a directory" in one_line(capsys)
    assert f.read_text() == "keep"


def test_measure_refuses_a_gpu_it_does_not_have_and_an_unwritable_run_dir(tmp_path, capsys, monkeypatch):
    import torch

    from gapray.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPUs, wherever this runs
    sample = str(CONF_DIR / "prompts" / "geneval_sample.jsonl")
    run_dir = tmp_path / "m"
    assert main(["measure", "model=tiny", "model.device=cuda", f"prompts={sample}", f"run_dir={run_dir}"]) == 2
    assert "model.device=cuda" in one_line(capsys) and not run_dir.exists()
    f = tmp_path / "file"
    f.write_text("keep")
    assert main(["measure", "model=tiny", f"prompts={sample}", "images_per_prompt=1", f"run_dir={f / 'm'}"]) == 2
    assert "is a file" in one_line(capsys)


def test_a_run_whose_checkpoints_do_not_fit_the_disk_is_refused(tmp_path, monkeypatch):
    """Before: a run found a full disk when it wrote a checkpoint, after sampling and part of training."""
    import shutil
    from collections import namedtuple

    from gapray.plan import model_arch, run_dir_bytes

    run = cfg(f"run_dir={tmp_path / 'new' / 'run'}", "mode=c-dpo", "rounds=2", "train.backend=ray")
    need, how = run_dir_bytes(run, model_arch(run.model.path))
    assert "4 training parts" in how and need > 0  # c- modes train twice a round
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(need * 10, need * 9, need * 0.9))
    msg = refused(preflight.check_space, run)
    assert msg.startswith(f"run_dir '{tmp_path / 'new' / 'run'}': the run writes up to") and "GiB free" in msg
    assert "train.checkpoint.num_to_keep" in msg
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(need * 10, need * 8, need * 1.1))
    preflight.check_space(run)


def test_an_embedded_ray_head_on_a_full_temp_filesystem_is_refused(tmp_path, monkeypatch):
    """Before: Ray started, then failed its first object (OutOfDiskError) with the disk past 95% used."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(path) or usage(100 * 2**30, 97 * 2**30, 3 * 2**30))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "big"))
    run = cfg(f"run_dir={tmp_path / 'run'}", "backend=ray")
    msg = refused(preflight.check_temp_space, run)
    assert msg == (f"Ray's temp dir '{tmp_path / 'big' / 'ray'}' is on a filesystem 97% full ({tmp_path}, 3.0 GiB "
                   "free) and Ray refuses to create objects past 95%: free space there, or set RAY_TMPDIR=PATH to a "
                   "larger volume")
    assert seen == [tmp_path]  # the nearest existing parent of a temp dir not made yet
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "0.99")  # Ray's own knob moves the line
    preflight.check_temp_space(run)
    monkeypatch.delenv("RAY_local_fs_capacity_threshold")
    preflight.check_temp_space(cfg(f"run_dir={tmp_path / 'run'}", "backend=local", "train.backend=local"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster's nodes keep their own temp dirs
    preflight.check_temp_space(run)
