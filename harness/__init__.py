"""DefectBench: one protocol for few-shot industrial defect generation.

The names a method needs are importable from here: `from harness import Method, GeneratedSample`.
"""
from harness.methods import FewShotTask, GeneratedSample, GenerationRequest, Item, Method, Target

__version__ = "0.1.0"
__all__ = ["FewShotTask", "GeneratedSample", "GenerationRequest", "Item", "Method", "Target", "__version__"]
