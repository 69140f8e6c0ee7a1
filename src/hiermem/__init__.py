"""hiermem: pretraining small language models with hierarchical parametric memories."""

__version__ = "0.1.0"
