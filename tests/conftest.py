"""Shared fixtures and helpers. Tests run on CPU with tiny models built offline (no hub access)."""

import os
import socket

import pytest
import torch

# Ray must bind to loopback only (DESIGN.md): set before any Ray import in this process.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# No hub at test time: a hub id must fail at once instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a circle"]


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Janus (32 px, 64 image tokens) wrapped as a gapray JanusModel."""
    from gapray.models import JanusModel
    from gapray.models.builders import build_tiny_janus

    model, processor = build_tiny_janus(PROMPTS, seed=0)
    return JanusModel(model, processor)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved as a save_pretrained directory (model + processor)."""
    path = tmp_path_factory.mktemp("tiny_janus")
    tiny.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole suite (ray.init costs ~6 s), bound to 127.0.0.1.

    Logical CPUs are sized above the 2 physical cores on purpose: Serve replicas, Data actors and Train
    workers mostly wait on each other in tests, and must not starve one another of CPU slots.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all bound at once, then released), for a `ray start` of a test's own."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports

