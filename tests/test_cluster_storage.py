"""A run directory every node sees (gapray.preflight.check_run_dir_shared), on a real Ray head on 127.0.0.1 and a
driver that does not share its view of one directory: the driver runs in a mount namespace of its own
(`unshare -m`) with a tmpfs over it, so what it writes there the node does not see, as a node without the shared
mount would not. (A second node cannot be started here: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps
Ray on loopback, Ray refuses multi-node clusters.) Before: such a run started, and failed or lost checkpoints
when a Train worker or Data task on that node wrote them.)"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import free_ports

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(32)  # Ray 2.60's token authentication, kept on


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` (a mount namespace) for the unshared driver")


@pytest.fixture(scope="module")
def cluster():
    hidden = Path(tempfile.mkdtemp(prefix="gapray-unshared-", dir="/tmp"))
    temp = tempfile.mkdtemp(prefix="gc", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, agent, agent_grpc, renv = free_ports(4)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={renv}", f"--temp-dir={temp}", "--block",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--num-cpus=2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield {"env": {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, "hidden": hidden}
    head.terminate()  # `ray start --block` drains the node and stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)
    shutil.rmtree(hidden, ignore_errors=True)
    shutil.rmtree(temp, ignore_errors=True)


PROBE = """
import sys, time
import ray
from gapray.errors import UserError
from gapray.preflight import check_run_dir_shared, cluster_connection
for _ in range(60):  # the head takes a few seconds to come up
    try:
        ray.init(log_to_driver=False, logging_level="ERROR")
        break
    except Exception:
        time.sleep(1)
with cluster_connection():
    try:
        check_run_dir_shared(sys.argv[1])
    except UserError as e:
        print(e)
        sys.exit(2)
"""


def blind(cluster, *cmd: str) -> list[str]:
    """`cmd` in a mount namespace where the cluster's hidden directory is a tmpfs of its own."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs gapray-blind {cluster['hidden']} && exec \"$@\"", "sh", *cmd]


def probe(cluster, run_dir: Path, unshared: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", PROBE, str(run_dir)]
    return subprocess.run(blind(cluster, *cmd) if unshared else cmd, cwd=REPO, env=cluster["env"],
                          capture_output=True, text=True, timeout=180)


def test_a_run_dir_every_node_sees_passes_and_is_left_as_it_was(cluster, tmp_path):
    out = probe(cluster, tmp_path / "new" / "run")
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert not (tmp_path / "new").exists()  # made for the probe, removed again


def test_a_run_dir_one_node_does_not_see_is_refused_before_any_work(cluster):
    run_dir = cluster["hidden"] / "run"
    out = probe(cluster, run_dir, unshared=True)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    assert out.stdout.strip() == (f"run_dir '{run_dir}' is not shared: 1 of 1 nodes (127.0.0.1) do not see it at "
                                  f"{run_dir}; mount the same storage there on every node (cluster/README.md, "
                                  "Storage), or choose a run_dir on it")
    # the whole job, as a user submits it: one line, exit 2, nothing written
    job = subprocess.run(blind(cluster, sys.executable, "jobs/self_improve.py", "model=tiny", "backend=ray",
                               "train.backend=local", "mode=sft", "max_prompts=4", "images_per_prompt=2",
                               f"run_dir={run_dir}"),
                         cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=180)
    assert job.returncode == 2, job.stderr[-2000:]
    assert job.stderr.strip().splitlines()[-1].startswith(f"jobs/self_improve.py: error: run_dir '{run_dir}' is not "
                                                          "shared: 1 of 1 nodes")
    assert not run_dir.exists()
