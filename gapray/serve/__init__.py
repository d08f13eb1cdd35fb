"""Ray Serve hosting of a UnifiedModel: ModelServer replicas that sample and self-score (server.py)."""

from gapray.serve.server import (DEPLOYMENT, ModelServer, app_builder, build_app, deploy, handle, reload,
                                 replica_actor_names, start_serve)

__all__ = ["DEPLOYMENT", "ModelServer", "app_builder", "build_app", "deploy", "handle", "reload",
           "replica_actor_names", "start_serve"]
