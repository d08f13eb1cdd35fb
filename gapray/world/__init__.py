"""
The shapes world: gapray's embedded, closed stand-in for GenEval.

A closed world of coloured geometric shapes on a plain background: a prompt grammar in GenEval's
metadata schema with seeded train / eval / composition splits (grammar.py), a renderer that
draws random scenes satisfying a prompt (render.py), and an exact, pixel-reading oracle judge that
applies GenEval's rules (oracle.py). The shipped prompt splits are in data/.
"""

import importlib

from .oracle import evaluate, explain, in_world, inspect, judge
from .render import BACKGROUND, COLORS, PALETTE, RELATIONS, SHAPES, render

# grammar's names are imported on first use (PEP 562), so that `python -m gapray.world.grammar`
# finds grammar not yet imported (runpy warns when a module it runs was imported by its package)
_GRAMMAR = ("TASKS", "COUNTS", "SPLITS", "make_prompts", "load_world_prompts", "dev_split", "heldout_bindings",
            "prompt_space", "bindings", "perturbations")

__all__ = ["SHAPES", "COLORS", "RELATIONS", "PALETTE", "BACKGROUND", *_GRAMMAR,
           "render", "judge", "inspect", "explain", "evaluate", "in_world"]


def __getattr__(name):
    if name in _GRAMMAR:
        return getattr(importlib.import_module(".grammar", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
