"""gapray: self-improvement of unified multimodal models from their own understanding."""

__version__ = "0.1.0"
