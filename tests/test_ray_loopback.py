"""Ray must listen on loopback only (DESIGN.md): every socket its processes listen on is 127.0.0.1."""

import ipaddress

import psutil


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None and addr.ipv4_mapped.is_loopback)


def test_ray_binds_to_loopback_only(ray_cluster):
    ray = ray_cluster
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    ray_pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmd and ("gcs_server" in cmd or "raylet" in cmd or "default_worker" in cmd or "dashboard" in cmd):
            ray_pids.add(proc.info["pid"])
    assert ray_pids, "no Ray processes found"
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    assert listening, "Ray processes listen on no socket?"
    bad = sorted({c.laddr.ip for c in listening if not is_loopback(c.laddr.ip)})
    assert not bad, f"Ray listens on non-loopback addresses: {bad}"
