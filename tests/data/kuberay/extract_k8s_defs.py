"""Regenerate k8s-v*.json here from the Kubernetes JSON schemas shipped in the `kubernetes-validate` wheel.

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python tests/data/kuberay/extract_k8s_defs.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl

For each Kubernetes version the KubeRay CRDs here were generated against, it keeps the core/v1 definitions
reachable from the types the CRDs embed (PodSpec, ServiceSpec/Status, EnvVar, ...) plus the objects our
manifests declare next to them (ConfigMap, PersistentVolumeClaim), drops `description` texts (as KubeRay's
controller-gen does with maxDescLen=0) and rewrites `$ref`s to point inside the one file. Quantity and
IntOrString take the exact forms the CRDs use (int-or-string with the resource.Quantity pattern).
"""

import json
import sys
import zipfile

VERSIONS = {"v1.35.0": "k8s-v1.35.json", "v1.30.0": "k8s-v1.30.json"}
ROOTS = [
    "io.k8s.api.core.v1.PodSpec",
    "io.k8s.api.core.v1.ServiceSpec",
    "io.k8s.api.core.v1.ServiceStatus",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.api.core.v1.ConfigMap",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
]
PREFIX = "/api/_definitions.json#/$defs/"
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
                    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
CRD_FORMS = {  # as in the KubeRay CRDs (controller-gen), stricter than the OpenAPI `string | number`
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {
        "anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True},
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {
        "anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
}


def _clean(node, refs):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "$ref":
                name = value[len(PREFIX):] if value.startswith(PREFIX) else value.split("/")[-1]
                refs.add(name)
                value = "#/$defs/" + name
            out[key] = _clean(value, refs)
        return out
    if isinstance(node, list):
        return [_clean(v, refs) for v in node]
    return node


def extract(defs: dict) -> dict:
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        refs: set = set()
        keep[name] = CRD_FORMS.get(name) or _clean(defs[name], refs)
        todo.extend(sorted(refs - set(keep)))
    return dict(sorted(keep.items()))


def main(wheel: str, out_dir: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for version, out_name in VERSIONS.items():
            src = f"kubernetes_validate/kubernetes-json-schema/{version}-local-strict/_definitions.json"
            defs = json.loads(zf.read(src))["$defs"]
            doc = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                   "$comment": f"core/v1 subset of Kubernetes {version} ({src} in {wheel.split('/')[-1]}); "
                               "regenerate with extract_k8s_defs.py",
                   "$defs": extract(defs)}
            with open(f"{out_dir}/{out_name}", "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            print(out_name, len(doc["$defs"]), "definitions")


if __name__ == "__main__":
    import os

    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__)))
