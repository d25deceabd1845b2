"""castspec: lossless speculative decoding with cost-aware dynamic draft trees (CAST) for Hugging Face causal LMs."""

from castspec.api import load_generator
from castspec.engine import GenerationResult, SpeculativeGenerator
from castspec.errors import CastspecError

__all__ = ["CastspecError", "GenerationResult", "SpeculativeGenerator", "load_generator"]
__version__ = "0.1.0"
