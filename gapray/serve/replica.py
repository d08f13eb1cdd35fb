"""What every gapray Serve app needs, whatever its deployment (ModelServer, JudgeServer): Serve on loopback."""

from __future__ import annotations

import dataclasses
import logging

from omegaconf import DictConfig, OmegaConf
from ray import serve

DEPLOYMENT = "ModelServer"  # the policy's deployment (gapray/serve/server.py), the name its handles are got by


def start_serve(http_port: int = 8000, log_level: str = "WARNING") -> None:
    """Start Serve (or attach to it) with its HTTP proxy on 127.0.0.1 only, on the head node only; Serve's own
    log lines (controller, proxy) from `log_level` up, here too (this process holds handles)."""
    quiet_serve_logs(log_level)
    serve.start(http_options={"host": "127.0.0.1", "port": int(http_port)}, proxy_location="HeadOnly",
                logging_config={"log_level": log_level})


def hide_batch_bound_warning() -> None:
    """In a replica: Serve warns when an @serve.batch's max_batch_size exceeds max_ongoing_requests ("will never
    achieve the configured max_batch_size"). Not so for gapray's replicas, which count batches in rows or images
    and cut every call into one piece per image, so one call alone can fill a batch."""
    logging.getLogger("ray.serve").addFilter(lambda r: "larger than `max_ongoing_requests`" not in r.getMessage())


def quiet_serve_logs(log_level: str = "WARNING") -> None:
    """Serve's logger in a process that calls deployments (the driver, pipeline actors): from `log_level` up."""
    logging.getLogger("ray.serve").setLevel(log_level)


def deployment_logging(serve_cfg: dict) -> dict:
    """A deployment's logging_config: its replicas' lines from serve.log_level up, a line per request only with
    serve.access_log."""
    return {"enable_access_log": bool(serve_cfg.get("access_log", False)),
            "log_level": serve_cfg.get("log_level", "WARNING")}


def plain_config(cfg) -> dict:
    """A config section (DictConfig, dataclass or mapping) as a plain dict: what deployments are bound with."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def keep_replica_grpc_on_loopback() -> None:
    """On a loopback-only node, bind this replica's inter-deployment gRPC server to 127.0.0.1.

    Ray Serve 2.60 binds it to [::]:0, all interfaces, whatever the node's IP; gapray's rule is that Ray
    listens on 127.0.0.1 only where the node is 127.0.0.1 (DESIGN.md). Peers reach a replica at its node
    IP, so on such a node binding loopback changes nothing else. Runs in the replica's constructor, which
    Serve calls before it starts that server; a Ray without this hook is left alone.
    """
    import ray
    import ray.serve._private.replica as replica_impl

    bind = getattr(replica_impl, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback_only", False) or ray.util.get_node_ip_address() != "127.0.0.1":
        return

    def bind_loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    bind_loopback.loopback_only = True
    replica_impl.add_port_to_grpc_server = bind_loopback
