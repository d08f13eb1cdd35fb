"""Where images are drawn and judged: one home per backend, both built on gapray.selfjudge.

A backend is what the curriculum driver holds (gapray/curriculum.py) and calls, phase by phase:
    serve(checkpoint, policy_version)   serve these weights from now on (None: the base model)
    fill(prompts, ledger, round, k, seed, desc) -> rows added
                                        draw and judge the images the ledger's round lacks (k per prompt)
    rescore(rows, prompts, ledger, round) -> rows added
                                        judge images drawn earlier again with the serving policy (the win rate)
    decode(tokens) / reencode(tokens)   image tokens -> pixels / -> the tokens of their decoded picture
    reference()                         (prompts, tokens) -> reference log-probs, under the serving policy
    release()                           (ray only) give the replicas' GPUs to training until serve() again

`LocalBackend` (gapray/backends/local.py): one process, the model in memory. `RayBackend`
(gapray/backends/ray.py): Serve replicas and Ray Data; the same ledger rows for the same seeds. Importing this
package imports neither; `build_backend` imports the one a config asks for (backend=local never imports Ray).
"""

from __future__ import annotations


def build_backend(cfg):
    """The backend `cfg.backend` names (local or ray), for a self-improvement config."""
    if cfg.backend == "ray":
        from gapray.backends.ray import RayBackend
        return RayBackend(cfg)
    from gapray.backends.local import LocalBackend
    return LocalBackend(cfg)
