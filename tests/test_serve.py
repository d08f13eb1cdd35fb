"""ModelServer on Ray Serve: dynamic batching that never changes an image, in-place weight reload with a
policy_version on every answer, HTTP routes, and nothing listening beyond 127.0.0.1. One app per module."""

import base64
import io
import ipaddress
import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

from gapray.config import ModelConfig, ServeConfig
from gapray.errors import UserError
from gapray.models.sampler import image_seed
from gapray.models import JanusModel, SamplingParams
from gapray.serve.server import (SampleRequest, app_builder, deploy, free_port, http_url, reload,
                                 replica_actor_names)

ROOT = Path(__file__).resolve().parent.parent
APP, PREFIX = "gapray-serve-test", "/gapray-serve-test"
PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle"]


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_dir):
    from ray import serve

    # log_level INFO (the default is WARNING): the access-log test below reads the replicas' own INFO lines
    cfg = ServeConfig(app_name=APP, route_prefix=PREFIX, http_port=free_port(), max_batch_size=16,
                      batch_wait_timeout_s=0.1, num_cpus=1, log_level="INFO")
    model = ModelConfig(path=tiny_dir, device="cpu")
    handle = deploy(model, cfg)
    yield handle, model, cfg
    serve.delete(APP)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:  # 127.0.0.1 only (http_url)
        return json.loads(r.read())


def seeds_of(i: int, n: int = 2) -> list[int]:
    return [1000 * i + j for j in range(n)]


def test_a_request_is_cut_into_one_piece_per_image():
    guided, plain = SamplingParams(guidance_scale=5.0), SamplingParams(guidance_scale=1.0)
    assert SampleRequest("p", (1, 2, 3), guided).rows == 6 and SampleRequest("p", (1, 2, 3), plain).rows == 3
    assert [(r.seeds, r.rows) for r in SampleRequest("p", (1, 2, 3), guided).pieces()] == [((1,), 2), ((2,), 2), ((3,), 2)]


def test_concurrent_requests_form_full_batches_and_keep_every_image(app, tiny):
    """Six calls of 3 guided images (6 model rows each) become 18 one-image pieces: a batch fills to exactly
    max_batch_size (16) rows with the images of several calls and prompts, where whole calls could fill 12."""
    handle, _, cfg = app
    before = handle.stats.remote().result()
    prompts = [PROMPTS[i % 3] for i in range(6)]
    responses = [handle.sample.remote(p, seeds_of(i, 3)) for i, p in enumerate(prompts)]
    answers = [r.result() for r in responses]
    stats = handle.stats.remote().result()
    batches = stats["sample"][len(before["sample"]):]
    assert sum(n for n, _ in batches) == 18 and sum(rows for _, rows in batches) == 36
    assert max(rows for _, rows in batches) == cfg.max_batch_size, f"no batch was filled: {batches}"
    assert all(rows <= cfg.max_batch_size for _, rows in batches)  # counted in model rows: 2 per guided image
    # batching changes no image: each equals the image drawn alone from its prompt and seed
    for i, (p, a) in enumerate(zip(prompts, answers)):
        alone = tiny.sample([p], 3, SamplingParams(), seeds_of(i, 3))
        assert a["tokens"].tolist() == alone.tokens.tolist() and a["policy_version"] == 0
        torch.testing.assert_close(torch.tensor(a["logprobs"]), alone.logprobs)

    scored = [handle.score.remote(p, a["tokens"]) for p, a in zip(prompts, answers)]
    scored = [r.result() for r in scored]
    after = handle.stats.remote().result()["score"][len(before["score"]):]
    assert sum(n for n, _ in after) == 18 and max(n for n, _ in after) > 3  # images of more than one call
    for p, a, s in zip(prompts, answers, scored):
        alone = tiny.score([p] * 3, tiny.decode(torch.tensor(a["tokens"], dtype=torch.long)))
        np.testing.assert_allclose(s["p_aligned"], alone.p_aligned, rtol=1e-5, atol=1e-6)


def test_a_call_larger_than_a_batch_is_answered_whole(app, tiny):
    """10 guided images are 20 model rows, beyond max_batch_size 16: Serve refuses such an item ("Size of item is
    greater than max_batch_size"), so the replica cuts the call into pieces; same images as drawn alone."""
    handle, _, cfg = app
    seeds = seeds_of(7, 10)
    assert 2 * len(seeds) > cfg.max_batch_size
    a = handle.sample.remote(PROMPTS[1], seeds).result()
    alone = tiny.sample([PROMPTS[1]], 10, SamplingParams(), seeds)
    assert a["tokens"].tolist() == alone.tokens.tolist() and a["seeds"] == seeds
    s = handle.score.remote(PROMPTS[1], a["tokens"]).result()
    np.testing.assert_allclose(s["p_aligned"], tiny.score([PROMPTS[1]] * 10, tiny.decode(alone.tokens)).p_aligned,
                               rtol=1e-5, atol=1e-6)


def test_a_replica_sizes_its_batches_from_its_memory(app, tiny_dir, tiny):
    """serve.max_batch_size=null: the replica's rows are what its device's free memory holds with its weights loaded
    (the same computation here, in this process on the same machine, within 10%: MemAvailable moves)."""
    from ray import serve

    from gapray.plan import memory_batch_rows

    cfg = ServeConfig(app_name=APP + "-memory", route_prefix=None, max_batch_size=None, num_cpus=1,
                      http_port=app[2].http_port)
    handle = deploy(ModelConfig(path=tiny_dir, device="cpu"), cfg)
    try:
        rows = handle.stats.remote().result()["max_batch_size"]
        assert rows == pytest.approx(memory_batch_rows(tiny), rel=0.1) and rows > 1000
        a = handle.sample.remote(PROMPTS[0], seeds_of(1)).result()
        assert a["tokens"].tolist() == tiny.sample([PROMPTS[0]], 2, SamplingParams(), seeds_of(1)).tokens.tolist()
    finally:
        serve.delete(cfg.app_name)


def test_http_routes_on_loopback_only(app):
    handle, _, _ = app
    url = http_url(PREFIX)
    assert url.startswith("http://127.0.0.1:")
    out = post(f"{url}/sample", {"prompt": PROMPTS[0], "n": 3, "seed": 5, "png": True})
    seeds = [image_seed(5, PROMPTS[0], j) for j in range(3)]
    assert out["seeds"] == seeds and out["policy_version"] == 0
    direct = handle.sample.remote(PROMPTS[0], seeds).result()
    assert out["image_tokens"] == direct["tokens"].tolist()
    assert Image.open(io.BytesIO(base64.b64decode(out["png_base64"][0]))).size == (32, 32)
    score = post(f"{url}/score", {"prompt": PROMPTS[0], "image_tokens": out["image_tokens"][1], "threshold": 0.3})
    want = handle.score.remote(PROMPTS[0], [out["image_tokens"][1]]).result()["p_aligned"][0]
    assert score["p_aligned"] == pytest.approx(want, rel=1e-5) and score["verdict"] == int(want >= 0.3)
    with pytest.raises(urllib.error.HTTPError, match="422"):
        post(f"{url}/score", {"prompt": PROMPTS[0], "image_tokens": [1, 2, 3]})
    # every socket this test session's Ray processes listen on (HTTP proxy and replicas included) is loopback
    mine = psutil.Process().children(recursive=True)
    listening = [c for p in mine for c in _listening(p)]
    assert listening and all(_loopback(c.laddr.ip) for c in listening), sorted({c.laddr.ip for c in listening})


def _listening(proc):
    try:
        return [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def test_reload_swaps_weights_in_place_and_bumps_policy_version(app, tiny_dir, tmp_path):
    handle, model, cfg = app
    other = JanusModel.from_pretrained(tiny_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    other.save_pretrained(str(tmp_path / "step1"))

    replicas, pid = replica_actor_names(APP), handle.stats.remote().result()["pid"]
    base = handle.sample.remote(PROMPTS[1], seeds_of(7, 3)).result()
    reload(model, cfg, checkpoint=str(tmp_path / "step1"), policy_version=1)
    new = handle.sample.remote(PROMPTS[1], seeds_of(7, 3)).result()
    assert new["policy_version"] == 1 and new["tokens"].tolist() != base["tokens"].tolist()
    assert handle.score.remote(PROMPTS[1], new["tokens"]).result()["policy_version"] == 1
    with urllib.request.urlopen(f"{http_url(PREFIX)}/version", timeout=60) as r:
        assert json.loads(r.read()) == {"policy_version": 1, "checkpoint": str(tmp_path / "step1")}
    # the same replica process, reconfigured: no restart
    assert replica_actor_names(APP) == replicas and handle.stats.remote().result()["pid"] == pid

    reload(model, cfg, checkpoint=None, policy_version=2)  # back to the base weights, exactly
    again = handle.sample.remote(PROMPTS[1], seeds_of(7, 3)).result()
    assert again["policy_version"] == 2 and again["tokens"].tolist() == base["tokens"].tolist()
    assert handle.stats.remote().result()["pid"] == pid


def test_app_builder_and_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    conf = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "conf/serve.yaml").read_text()))
    assert conf.http_options.host == "127.0.0.1"
    spec = conf.applications[0]
    assert spec.import_path == "gapray.serve.server:app_builder"
    assert spec.deployments[0].user_config == {"checkpoint": None, "policy_version": 0}
    dep = app_builder(spec.args)._bound_deployment
    assert dep.name == "ModelServer" and dep.num_replicas == 1 and dep.max_ongoing_requests >= 32
    auto = app_builder({"model": "tiny", "serve": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                                                   "num_gpus": 0.5}})._bound_deployment
    assert auto._deployment_config.autoscaling_config.max_replicas == 3
    assert auto.ray_actor_options["num_gpus"] == 0.5
    with pytest.raises(UserError, match="serve.max_batch_siz"):
        app_builder({"model": "tiny", "serve": {"max_batch_siz": 8}})
    with pytest.raises(UserError, match="max_batch_size"):
        app_builder({"model": "tiny", "serve": {"max_batch_size": 1}})


def test_replicas_write_no_access_log_line_per_request(app, tiny):
    """serve.access_log=false (the default): Serve's line per request ('CALL sample OK 12.3ms'), ~1,100 of the
    ~1,500 lines `make run` printed, is not written; the replicas' own log lines still are."""
    import ray

    handle, _, _ = app
    handle.sample.remote(PROMPTS[0], seeds_of(0)).result(timeout_s=120)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    replica_logs = list(logs.glob(f"replica_{APP}_*.log"))
    assert replica_logs, sorted(p.name for p in logs.iterdir())
    text = "\n".join(p.read_text() for p in replica_logs)
    assert text.strip()  # the replica logs (start-up, batches) are there
    assert not re.search(r"\bCALL \w+ OK [0-9.]+ms", text), re.search(r".*\bCALL \w+ OK .*", text).group(0)


def test_serve_is_quiet_by_default():
    """No access log and nothing below WARNING from Serve's replicas unless asked (make run printed ~1,500 lines)."""
    from gapray.serve.server import deployment_options

    assert deployment_options(ServeConfig())["logging_config"] == {"enable_access_log": False, "log_level": "WARNING"}
    assert deployment_options(ServeConfig(access_log=True, log_level="INFO"))["logging_config"] == \
        {"enable_access_log": True, "log_level": "INFO"}
