"""The external judge on the Ray path, where the images already are: inside the ModelServer replica that drew them.

The shapes oracle is cheap (numpy on 32 px images): each replica builds its own. A VLM judge (gapray/judges/vlm.py)
is a model of its own, so it gets a Serve app of its own, `JudgeServer`: its replicas (judge.num_replicas), its
resources (judge.num_gpus per replica, fractions allowed: two judge replicas may share a GPU), its dynamic batching
(judge.batch_size images per forward). A policy replica calls it with the pixels it has just decoded, inside the
same self_judge call, and writes its answer in the verdict rows next to its own (gapray.selfjudge.verdict_rows):
no pixels through Ray Data, one trip per image.

`judge_spec(cfg)` is what a ModelServer is deployed with (gapray.serve.server.deploy(..., judge=spec)); a spec
names a JudgeServer app once `deploy_judge` has deployed it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json

import numpy as np
from omegaconf import OmegaConf
from ray import serve

from gapray.serve.replica import (deployment_logging, hide_batch_bound_warning, keep_replica_grpc_on_loopback,
                                  plain_config, start_serve)

JUDGE_DEPLOYMENT = "JudgeServer"


def judge_spec(cfg) -> dict | None:
    """The run's judge section with its kind resolved (gapray.config.judge_kind); None: no external judge.
    A config without a judge section judges with the shapes oracle, as before the section existed."""
    from gapray.config import JudgeConfig, judge_kind

    if "judge" not in cfg:
        return {**dataclasses.asdict(JudgeConfig()), "kind": "oracle"}
    kind = judge_kind(cfg)
    section = OmegaConf.to_container(cfg.judge) if OmegaConf.is_config(cfg.judge) else dict(cfg.judge)
    return None if kind == "none" else {**section, "kind": kind}


def replica_judge(spec: dict | None):
    """The ExternalJudge a ModelServer replica judges with: built here (the oracle), or the JudgeServer app the
    spec names (a VLM; deploy_judge put its name in the spec)."""
    if spec is None:
        return None
    if spec["kind"] == "vlm":
        if not spec.get("app"):
            raise ValueError("a VLM judge on the Ray path runs in a JudgeServer app: deploy it first "
                             "(gapray.serve.judge.deploy_judge) and pass the spec it returns")
        return ServedJudge(spec["app"], spec["model"])
    from gapray.judges import build_judge
    return build_judge(OmegaConf.create({"judge": spec}))


class ServedJudge:
    """gapray.judges.ExternalJudge whose model runs in a JudgeServer app; called from a replica's worker thread."""

    def __init__(self, app_name: str, name: str):
        self.handle = serve.get_deployment_handle(JUDGE_DEPLOYMENT, app_name)
        self.name = name  # the ledger's judge_model: the VLM's id or path, as backend=local writes it

    def covers(self, prompt) -> bool:
        return True  # any text prompt (gapray.judges.vlm.VLMExternalJudge)

    def __call__(self, images, prompts: list) -> list[tuple[int | None, float | None]]:
        if not prompts:
            return []
        answer = self.handle.judge.remote(np.asarray(images), [p.prompt for p in prompts]).result()
        return [tuple(a) for a in answer]


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
    images: np.ndarray  # (n, H, W, 3) uint8
    prompts: tuple[str, ...]


def judge_rows(requests: list[JudgeRequest]) -> int:
    return sum(len(r.prompts) for r in requests)


@serve.deployment(name=JUDGE_DEPLOYMENT)
class JudgeServer:
    """Replicas holding one VLM judge each (gapray.judges.build_judge), judging batches of (image, prompt)."""

    def __init__(self, judge: dict, max_batch_size: int, batch_wait_timeout_s: float):
        from gapray.judges import build_judge
        from gapray.prompts import Prompt

        keep_replica_grpc_on_loopback()
        self.external = build_judge(OmegaConf.create({"judge": {**judge, "kind": "vlm"}}))  # not self.judge: the method
        self._prompt = lambda text: Prompt("", "", text)
        hide_batch_bound_warning()
        self._judge_batch.set_max_batch_size(max_batch_size)
        self._judge_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def judge(self, images, prompts: list[str]) -> list[tuple[int | None, float | None]]:
        # One piece per image, as ModelServer cuts its calls: a policy replica's batch may hold more images than
        # judge.batch_size (Serve refuses an item larger than a batch), and batches fill from any calls.
        images = np.asarray(images)
        parts = await asyncio.gather(*[self._judge_batch(JudgeRequest(images[i:i + 1], (p,)))
                                       for i, p in enumerate(prompts)])
        return [a for part in parts for a in part]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=judge_rows)
    async def _judge_batch(self, requests: list[JudgeRequest]) -> list[list[tuple]]:
        images = [im for r in requests for im in r.images]
        prompts = [self._prompt(t) for r in requests for t in r.prompts]
        out = await asyncio.to_thread(self.external, images, prompts)  # the event loop keeps taking requests
        answers, start = [], 0
        for r in requests:
            answers.append(out[start:start + len(r.prompts)])
            start += len(r.prompts)
        return answers


def judge_replicas(spec: dict) -> dict:
    """The JudgeServer's replica options: judge.autoscaling_config (Serve scales the replicas with the requests each
    has in flight, the policy replicas' judge calls), else a fixed judge.num_replicas."""
    auto = spec.get("autoscaling_config")
    if auto:
        return {"autoscaling_config": {k: v for k, v in auto.items() if v is not None}}
    return {"num_replicas": int(spec.get("num_replicas") or 1)}


def deploy_judge(spec: dict | None, serve_cfg, app_name: str) -> dict | None:
    """Deploy (or leave running) the JudgeServer app of a VLM spec and return the spec that names it, for
    gapray.serve.server.deploy; other specs come back as they are."""
    if spec is None or spec["kind"] != "vlm":
        return spec
    s = plain_config(serve_cfg)
    start_serve(s["http_port"], s.get("log_level", "WARNING"))
    init = {"judge": {k: v for k, v in spec.items() if k != "app"}, "max_batch_size": max(1, int(spec["batch_size"])),
            "batch_wait_timeout_s": s["batch_wait_timeout_s"]}
    gpus = s["num_gpus"] if spec.get("num_gpus") is None else spec["num_gpus"]
    if spec.get("device", "auto") == "auto" and not gpus:
        init["judge"]["device"] = "cpu"  # no GPU asked for: never grab one that happens to be visible
    version = hashlib.blake2b(json.dumps(init, sort_keys=True).encode(), digest_size=8).hexdigest()
    # max_ongoing_requests as the policy replicas' (Serve's default is 5 calls at once per replica)
    app = JudgeServer.options(**judge_replicas(spec), ray_actor_options={"num_cpus": s["num_cpus"], "num_gpus": gpus},
                              max_ongoing_requests=int(s["max_ongoing_requests"]),
                              logging_config=deployment_logging(s), version=version, _internal=True).bind(**init)
    serve.run(app, name=app_name, route_prefix=None)
    return {**spec, "app": app_name}
