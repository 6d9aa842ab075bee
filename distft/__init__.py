"""distft: distributed fine-tuning of causal LMs."""

__version__ = "0.1.0"
