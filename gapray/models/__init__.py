"""Model layer: the UnifiedModel interface, the Janus implementation, our CFG sampler, builders."""

from gapray.models.base import SampleOutput, ScoreOutput, UnifiedModel
from gapray.models.janus import JanusModel
from gapray.models.sampler import SamplingParams

__all__ = ["JanusModel", "SampleOutput", "SamplingParams", "ScoreOutput", "UnifiedModel"]
