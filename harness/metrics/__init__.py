"""Generation metrics: IS / FID / KID (torch-fidelity), IC-LPIPS and LPIPS to real, background and mask metrics."""
from harness.metrics.score import DIRECTION, LABELS, METRICS, MetricValue, ScoreConfig, Scorer, ScoreInputs

__all__ = ["DIRECTION", "LABELS", "METRICS", "MetricValue", "ScoreConfig", "ScoreInputs", "Scorer"]
