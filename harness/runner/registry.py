"""The modules that register job kinds and expanders (with @job_kind / @expander). A new kind of job is a
module listed here; the runner's core (plan, store, executors) does not change."""
from __future__ import annotations

import importlib

JOB_MODULES = (
    "harness.runner.backbone_jobs",  # backbone (found, or fine-tuned once per data set) -> fit of diffusion methods
    "harness.runner.generation_jobs",  # fit -> generate -> score
    "harness.runner.downstream_jobs",  # generate -> segment, classify; detect
)


def load_job_kinds() -> None:
    for module in JOB_MODULES:
        importlib.import_module(module)
