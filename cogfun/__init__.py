"""cogfun: a two-stage (precompute, then train) LoRA trainer for CogVideoX-Fun."""

__version__ = "0.1.0"
