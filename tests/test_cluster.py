"""cluster/: the Ray cluster-launcher configs and KubeRay manifests, checked offline.

- The launcher YAMLs (cluster/aws.yaml, cluster/gcp.yaml) validate against the ray-schema.json that ships with
  Ray, and pass Ray's own config preparation (`ray up` runs the same code before it touches a cloud).
- The KubeRay manifests validate against the RayCluster / RayJob CRD schemas vendored in tests/data/kuberay/
  (see the README there), unknown fields rejected as `kubectl apply` does.
- Beyond schemas: CPU-only heads, GPU groups that ask for GPUs with min <= max, torch installed before gapray
  and never torchvision, job submissions that ship `--working-dir .` and run jobs/*.py with valid keys.
- Negative cases prove each validator can fail.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY_DATA = Path(__file__).resolve().parent / "data" / "kuberay"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
# jobs/self_improve.py is being written next to this; every other entrypoint must exist already.
PENDING_JOBS: set[str] = set()  # job scripts documented before they exist
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
GPU = "nvidia.com/gpu"


def load_docs(rel: str) -> list:
    with open(CLUSTER / rel) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_launcher(rel: str) -> dict:
    (doc,) = load_docs(rel)
    return doc


def kind(rel: str, k: str) -> dict:
    (doc,) = [d for d in load_docs(rel) if d.get("kind") == k]
    return doc


def error_list(validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


# ---- every file parses ------------------------------------------------------------------------------

def test_every_cluster_yaml_parses():
    files = sorted(p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml"))
    assert set(LAUNCHER_FILES + KUBERAY_FILES) <= set(files), files
    for rel in files:
        docs = load_docs(rel)
        assert docs and all(isinstance(d, dict) for d in docs), rel


# ---- cluster launcher: Ray's schema and Ray's config preparation -----------------------------------

@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_config_matches_ray_schema(rel, ray_schema):
    validator = jsonschema.Draft7Validator(ray_schema)  # the schema declares draft-07
    assert error_list(validator, load_launcher(rel)) == []


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_config_passes_ray_config_preparation(rel):
    # Private API, on purpose: prepare_config (merge with the provider's defaults.yaml, docker checks,
    # per-type max_workers) and validate_config (the schema again, head_node_type among the node types,
    # sum(min_workers) <= max_workers) are what `ray up` runs before it needs cloud credentials. Ray has no
    # public offline validator; the provider bootstrap after them needs boto3/google clients and an account.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load_launcher(rel)))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_node_types(rel):
    config = load_launcher(rel)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    provider = config["provider"]["type"]

    # CPU-only head.
    assert head["resources"].get("GPU", 0) == 0
    assert "guestAccelerators" not in head["node_config"]
    if provider == "aws":
        assert not re.match(r"(p|g)\d", head["node_config"]["InstanceType"]), "GPU instance as head"
    else:
        assert not re.match(r"(a2|a3|g2)-", head["node_config"]["machineType"]), "GPU machine as head"

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpus = {name: t["resources"].get("GPU", 0) for name, t in workers.items()}
    assert all(n >= 1 for n in gpus.values()), gpus  # every worker group is a GPU group
    assert 1 in gpus.values(), "no 1-GPU node type for Serve replicas"
    assert max(gpus.values()) >= 4, "no multi-GPU node type for ZeRO-3 training"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] >= 1, name
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0

    if provider == "gcp":
        for name, t in workers.items():
            scheduling = t["node_config"]["scheduling"]
            # One object, not a list of one-key objects (ray-project/ray#46248), and GPU VMs cannot migrate.
            assert isinstance(scheduling, dict), name
            assert scheduling["onHostMaintenance"] == "TERMINATE", name
            assert any("nvidia-smi" in c for c in t["initialization_commands"]), name
        assert all(t["resources"].get("CPU") for t in types.values()), "GCP needs explicit resources"


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_installs_torch_then_gapray(rel):
    config = load_launcher(rel)
    setup = config["setup_commands"]
    torch_at = [i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch\b", c)]
    gapray_at = [i for i, c in enumerate(setup) if re.search(r"pip install .*-e /home/ray/gapray", c)]
    assert torch_at and gapray_at and torch_at[0] < gapray_at[0], setup
    assert config["file_mounts"] == {"/home/ray/gapray": ".", "/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    assert ".gitignore" in config["rsync_filter"]
    all_commands = [c for key, v in config.items() if key.endswith("_commands") for c in v]
    all_commands += [c for t in config["available_node_types"].values()
                     for c in t.get("initialization_commands", []) + t.get("worker_setup_commands", [])]
    assert not any("torchvision" in c for c in all_commands)
    assert config["docker"]["image"].startswith("rayproject/ray") and "gpu" in config["docker"]["image"]


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_starts_ray_on_the_private_network(rel):
    config = load_launcher(rel)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head and "--head" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    text = (CLUSTER / rel).read_text()
    # The loopback rule is for laptops and CI: with it, worker nodes refuse to join (cluster/README.md).
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in text
    assert "--node-ip-address=127.0.0.1" not in head + worker
    assert "dashboard-host=0.0.0.0" not in head  # the dashboard stays behind `ray dashboard`'s tunnel


# ---- KubeRay: the vendored CRD schemas --------------------------------------------------------------

def _strict(schema):
    """Unknown fields are errors (kubectl's --validate=strict); see tests/data/kuberay/README.md."""
    if isinstance(schema, list):
        for s in schema:
            _strict(s)
        return schema
    if not isinstance(schema, dict):
        return schema
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        for sub in schema.get(key, {}).values():
            _strict(sub)
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(schema.get(key), (dict, list)):
            _strict(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        _strict(schema.get(key, []))
    return schema


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def _int32(value):
        return not isinstance(value, int) or -2**31 <= value < 2**31

    @checker.checks("int64")
    def _int64(value):
        return not isinstance(value, int) or -2**63 <= value < 2**63

    return checker


@pytest.fixture(scope="module")
def k8s_validators():
    """{kind: Draft 2020-12 validator}: RayCluster, RayJob (vendored CRDs), ConfigMap, PersistentVolumeClaim."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry()
    for name in ("k8s-v1.35.json", "k8s-v1.30.json"):
        contents = _strict(json.loads((KUBERAY_DATA / name).read_text()))
        registry = registry.with_resource(name, Resource.from_contents(contents, DRAFT202012))
    checker = _format_checker()

    def make(schema):
        jsonschema.Draft202012Validator.check_schema(schema)
        return jsonschema.Draft202012Validator(schema, registry=registry, format_checker=checker)

    def crd(name):
        return make(_strict(yaml.safe_load((KUBERAY_DATA / name).read_text())))

    core = "k8s-v1.35.json#/$defs/io.k8s.api.core.v1."
    return {
        "RayCluster": crd("ray.io_rayclusters.v1.yaml"),
        "RayJob": crd("ray.io_rayjobs.v1.yaml"),
        "ConfigMap": make({"$ref": core + "ConfigMap"}),
        "PersistentVolumeClaim": make({"$ref": core + "PersistentVolumeClaim"}),
    }


def test_vendored_schemas_are_small_and_documented():
    readme = (KUBERAY_DATA / "README.md").read_text()
    for path in KUBERAY_DATA.iterdir():
        assert path.stat().st_size < 1_000_000, path
    for commit in ("017710c025a86af5225c0e68cd78fb06e2918296", "037e91b0e311e6240431a4dcb111fab341a6f613"):
        assert commit in readme


@pytest.mark.parametrize("rel", KUBERAY_FILES)
def test_kuberay_manifests_match_crd_schemas(rel, k8s_validators):
    docs = load_docs(rel)
    assert {d["kind"] for d in docs} <= set(k8s_validators), [d["kind"] for d in docs]
    for doc in docs:
        assert doc["apiVersion"] == ("ray.io/v1" if doc["kind"].startswith("Ray") else "v1")
        assert error_list(k8s_validators[doc["kind"]], doc) == [], doc["kind"]


def _cluster_spec(rel: str) -> dict:
    if rel.endswith("raycluster.yaml"):
        return kind(rel, "RayCluster")["spec"]
    return kind(rel, "RayJob")["spec"]["rayClusterSpec"]


def _limits(container: dict) -> dict:
    return container.get("resources", {}).get("limits", {})


@pytest.mark.parametrize("rel", KUBERAY_FILES)
def test_kuberay_head_and_gpu_groups(rel):
    spec = _cluster_spec(rel)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]["template"]["spec"]
    for c in head["containers"]:  # CPU-only head: no GPU request or limit
        assert GPU not in _limits(c) and GPU not in c.get("resources", {}).get("requests", {})
    assert head["containers"][0]["resources"]["limits"]["cpu"]

    groups = spec["workerGroupSpecs"]
    gpus = {}
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] >= 1, g["groupName"]
        ray_container = g["template"]["spec"]["containers"][0]
        limit = int(_limits(ray_container).get(GPU, 0))
        assert limit >= 1, f"{g['groupName']} asks for no GPU"
        assert int(ray_container["resources"]["requests"][GPU]) == limit  # extended resources: requests == limits
        assert any(t.get("key") == GPU for t in g["template"]["spec"].get("tolerations", []))
        gpus[g["groupName"]] = limit
    assert 1 in gpus.values(), "no 1-GPU group for Serve replicas"
    assert max(gpus.values()) >= 4, "no multi-GPU group for ZeRO-3 training"
    assert len({g["groupName"] for g in groups}) == len(groups)


@pytest.mark.parametrize("rel", KUBERAY_FILES)
def test_kuberay_pods_share_storage_and_shm(rel):
    (pvc,) = [d for d in load_docs(rel) if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = _cluster_spec(rel)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        volumes = {v["name"]: v for v in t["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in t["spec"]["containers"][0]["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        claim = volumes[mounts["/mnt/gapray"]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]


@pytest.mark.parametrize("rel", KUBERAY_FILES)
def test_kuberay_pods_install_torch_then_gapray(rel):
    docs = load_docs(rel)
    (ray_obj,) = [d for d in docs if d["kind"].startswith("Ray")]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    # KubeRay runs the container's own command only with this annotation (copied from a RayJob to its cluster).
    assert ray_obj["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = _cluster_spec(rel)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        container = t["spec"]["containers"][0]
        script = " ".join(container["command"] + container["args"])
        assert script.index('"$GAPRAY_TORCH"') < script.index('"$GAPRAY_PACKAGE"') < script.index(
            "$KUBERAY_GEN_RAY_START_CMD")
        assert "ulimit -n" in script
        assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in container["envFrom"]
        assert container["image"] == f"rayproject/ray:{spec['rayVersion']}-py311-gpu"
    assert re.fullmatch(r"torch==[\d.]+", config_map["data"]["GAPRAY_TORCH"])
    assert config_map["data"]["GAPRAY_PACKAGE"].startswith("gapray @ ")
    assert "torchvision" not in (CLUSTER / rel).read_text()


def test_kuberay_files_agree():
    # rayjob.yaml repeats raycluster.yaml's ConfigMap and PVC so that each applies on its own: no drift.
    for k in ("ConfigMap", "PersistentVolumeClaim"):
        assert kind(KUBERAY_FILES[0], k) == kind(KUBERAY_FILES[1], k), k
    versions = {_cluster_spec(rel)["rayVersion"] for rel in KUBERAY_FILES}
    versions |= {load_launcher(rel)["docker"]["image"].split(":")[1].split("-")[0] for rel in LAUNCHER_FILES}
    assert len(versions) == 1, f"Ray versions differ between cluster files: {versions}"


def test_rayjob_runs_self_improve():
    job = kind(KUBERAY_FILES[1], "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/self_improve.py"] and "experiment=janus-pro-7b" in argv
    _assert_job_script(argv[1])
    assert any(a.startswith("run_dir=/mnt/gapray/") for a in argv), "run_dir must be on the shared PVC"
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    # The submitter pod has no checkout: working_dir must be a remote zip (a local "." would be its cwd).
    assert re.match(r"(https|s3|gs)://.+\.zip$", runtime_env["working_dir"]), runtime_env
    assert job["submissionMode"] in SUBMISSION_MODES
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0


# ---- documented job submissions ---------------------------------------------------------------------

def _assert_job_script(script: str):
    path = ROOT / script
    assert script.startswith("jobs/") and script.endswith(".py"), script
    assert path.is_file() or path.name in PENDING_JOBS, f"{script} does not exist"


def _ray_job_submits(text: str) -> list[list[str]]:
    """Every `ray job submit ...` command in a README or in YAML comments, continuation lines joined."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(m.group(1)) for m in re.finditer(r"^\s*(ray job submit [^\n]*)", joined, re.MULTILINE)]


def _documented_submissions() -> list[tuple[str, list[str]]]:
    out = []
    for rel in ["README.md"] + LAUNCHER_FILES + KUBERAY_FILES:
        out += [(rel, argv) for argv in _ray_job_submits((CLUSTER / rel).read_text())]
    return out


def test_documented_submissions_ship_the_working_dir():
    submissions = _documented_submissions()
    assert len(submissions) >= 6
    for rel, argv in submissions:
        assert "--" in argv, (rel, argv)
        options, entrypoint = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        assert options[options.index("--working-dir") + 1] == ".", (rel, argv)
        assert options[options.index("--address") + 1] == "http://127.0.0.1:8265", (rel, argv)
        if "--runtime-env-json" in options:
            runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
            assert "working_dir" not in runtime_env or runtime_env["working_dir"] == "."
        assert entrypoint[0] == "python", (rel, argv)
        _assert_job_script(entrypoint[1])


def test_documented_overrides_are_valid_config_keys():
    from gapray.config import CONF_DIR, MeasureConfig, SelfImproveConfig, TrainConfig, load_config

    configs = {"jobs/measure.py": (MeasureConfig, "measure.yaml"), "jobs/train.py": (TrainConfig, "train.yaml"),
               "jobs/self_improve.py": (SelfImproveConfig, "self_improve.yaml")}
    checked = 0
    for rel, argv in _documented_submissions():
        entrypoint = argv[argv.index("--") + 1:]
        if entrypoint[1] in configs:
            schema, preset = configs[entrypoint[1]]
            load_config(schema, CONF_DIR / preset, entrypoint[2:])  # raises on an unknown key or bad value
            checked += 1
    assert checked >= 4


# ---- the validators can fail ------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), "('max_worker' was unexpected)"),  # misspelled key
    (lambda c: c.update(idle_timeout_minutes="ten"), "'ten' is not of type 'number'"),  # wrong type
    (lambda c: c["available_node_types"]["gpu_serve"].update(min_worker=1), "('min_worker' was unexpected)"),
    (lambda c: c["available_node_types"]["gpu_train"]["resources"].update(GPU=0.5),
     "0.5 is not of type 'integer'"),
])
def test_ray_schema_rejects_bad_launcher_configs(ray_schema, mutate, match):
    config = load_launcher("aws.yaml")
    mutate(config)
    errors = error_list(jsonschema.Draft7Validator(ray_schema), config)
    assert errors and any(match in e for e in errors), errors


def test_ray_config_preparation_rejects_too_few_max_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_launcher("gcp.yaml")
    config["available_node_types"]["gpu_serve"]["min_workers"] = config["max_workers"] + 1
    config["available_node_types"]["gpu_serve"]["max_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(config))


def _first_worker_group(doc):
    return doc["spec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("rel, kind_, mutate, match", [
    # misspelled KubeRay field
    ("kuberay/raycluster.yaml", "RayCluster",
     lambda d: _first_worker_group(d).update(maxReplica=_first_worker_group(d).pop("maxReplicas")),
     "('maxReplica' was unexpected)"),
    # wrong type of a KubeRay field
    ("kuberay/raycluster.yaml", "RayCluster",
     lambda d: _first_worker_group(d).update(minReplicas="zero"), "'zero' is not of type 'integer'"),
    # out of int32 range
    ("kuberay/raycluster.yaml", "RayCluster",
     lambda d: _first_worker_group(d).update(maxReplicas=2**31), "2147483648 is not a 'int32'"),
    # misspelled field inside the pod template (a core/v1 Container)
    ("kuberay/raycluster.yaml", "RayCluster",
     lambda d: _first_worker_group(d)["template"]["spec"]["containers"][0].update(
         resource=_first_worker_group(d)["template"]["spec"]["containers"][0].pop("resources")),
     "('resource' was unexpected)"),
    # a GPU count that is no Kubernetes quantity
    ("kuberay/raycluster.yaml", "RayCluster",
     lambda d: _first_worker_group(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(
         {GPU: "one"}), "'one' does not match"),
    # enum
    ("kuberay/raycluster.yaml", "RayCluster",
     lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Eager"), "'Eager' is not one of"),
    # RayJob: misspelled field, wrong type, missing required entrypoint
    ("kuberay/rayjob.yaml", "RayJob",
     lambda d: d["spec"].update(shutdownAfterJobFinish=d["spec"].pop("shutdownAfterJobFinishes")),
     "('shutdownAfterJobFinish' was unexpected)"),
    ("kuberay/rayjob.yaml", "RayJob",
     lambda d: d["spec"].update(ttlSecondsAfterFinished="10m"), "'10m' is not of type 'integer'"),
    ("kuberay/rayjob.yaml", "RayJob", lambda d: d["spec"].pop("entrypoint"), "'entrypoint' is a required property"),
    ("kuberay/rayjob.yaml", "RayJob",
     lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("rayStartParams"),
     "'rayStartParams' is a required property"),
    # the RayJob CRD embeds Kubernetes 1.30 pod specs: a 1.34 field (EnvVarSource.fileKeyRef) is unknown there
    ("kuberay/rayjob.yaml", "RayJob",
     lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
         env=[{"name": "X", "valueFrom": {"fileKeyRef": {"key": "k", "path": "p", "volumeName": "v"}}}]),
     "('fileKeyRef' was unexpected)"),
])
def test_crd_schemas_reject_bad_manifests(k8s_validators, rel, kind_, mutate, match):
    doc = kind(rel, kind_)
    mutate(doc)
    errors = error_list(k8s_validators[kind_], doc)
    assert errors and any(match in e for e in errors), errors


# ---- authentication: Ray's token auth stays on, Serve HTTP stays private --------------------------------

TOKEN_SECRET = "gapray-ray-token"
AUTH_OFF = re.compile(r"AUTH_MODE[^\n]{0,24}\bdisabled\b")  # env var, YAML key or system_config entry


def _token_env(container: dict) -> tuple[str | None, dict | None]:
    env = {e["name"]: e for e in container.get("env", [])}
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    return mode, env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")


@pytest.mark.parametrize("rel", KUBERAY_FILES)
def test_kuberay_pods_require_the_token_from_one_secret(rel):
    spec = _cluster_spec(rel)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if rel.endswith("rayjob.yaml"):  # the submitter calls the job API: it needs the token as well
        templates.append(kind(rel, "RayJob")["spec"]["submitterPodTemplate"])
    for t in templates:
        for c in t["spec"]["containers"]:
            assert _token_env(c) == ("token", {"name": TOKEN_SECRET, "key": "auth_token"}), c["name"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # no public load balancer for dashboard or GCS
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 not in {p["containerPort"] for p in head.get("ports", [])}  # Serve HTTP is not published


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_nodes_require_the_token(rel):
    config = load_launcher(rel)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), config[key]
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # the token on every node


def test_no_file_turns_auth_off_or_serves_http_publicly():
    """Nothing shipped disables Ray's token authentication, and Serve's HTTP proxy is only ever started
    on 127.0.0.1 (gapray calls replicas through handles; the routes are for local debugging)."""
    shipped = [p for d in ("cluster", "conf", "gapray", "jobs", "bench") for p in (ROOT / d).rglob("*")
               if p.is_file() and p.suffix in {".py", ".yaml", ".yml", ".md", ".json", ".sh"}]
    shipped += [ROOT / "README.md", ROOT / "Makefile"]
    for p in shipped:
        text = p.read_text(errors="ignore")
        assert not AUTH_OFF.search(text), f"{p.relative_to(ROOT)} turns token authentication off"
        for call in re.findall(r"serve\.start\([^)]*\)", text):
            assert '"host": "127.0.0.1"' in call, f"{p.relative_to(ROOT)}: {call}"
        assert not re.search(r"http_options[^\n]*0\.0\.0\.0", text), p
    starts = (ROOT / "gapray" / "serve" / "replica.py").read_text()  # start_serve: every gapray app starts Serve so
    assert re.search(r"serve\.start\(http_options=\{\"host\": \"127\.0\.0\.1\"", starts)
    assert "proxy_location=\"HeadOnly\"" in starts


def test_auth_check_catches_a_disabled_mode():
    """The pattern above is not vacuous: it flags the ways auth is switched off."""
    for text in ["export RAY_AUTH_MODE=disabled", "- {name: RAY_AUTH_MODE, value: disabled}",
                 'env_vars: {"RAY_AUTH_MODE": "disabled"}', "RAY_AUTH_MODE: disabled"]:
        assert AUTH_OFF.search(text), text


# ---- the Grafana dashboard ---------------------------------------------------------------------------------

def _defined_metrics() -> dict[str, str]:
    """Every ray.util.metrics name gapray defines -> its Prometheus name on Ray's endpoint."""
    from gapray.gauges import NAMES

    found = {f"gapray_run_{n}": "gauge" for n in NAMES}
    for p in (ROOT / "gapray").rglob("*.py"):
        text = p.read_text()
        for kind_, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\"(gapray_\w+)\"", text):
            found[name] = kind_.lower()
        if "gapray_train_" in text:  # the trainer names its gauges from its metric keys
            for key in re.findall(r"for k in \(([^)]*)\)\}", text):
                for k in re.findall(r"\"([^\"]+)\"", key):
                    found["gapray_train_" + k.replace("/", "_")] = "gauge"
    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}
    return {n: f"ray_{n}{suffix[k]}" for n, k in found.items()}


def test_grafana_dashboard_shows_every_gapray_metric():
    dashboard = json.loads((CLUSTER / "grafana" / "gapray.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"\bray_gapray_\w+", exprs))
    defined = _defined_metrics()
    assert len(defined) >= 17, defined  # 10 run gauges, Serve, Data and the trainer's
    assert set(defined.values()) == used, (set(defined.values()) ^ used)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "gapray-run"
