"""The job kinds, registered in one place, in the order the plan expands them (a kind reads the plan's indexes that
the kinds before it filled). A plugin adds its own: `KINDS.add("name", MyKind())` or `"module:OBJECT"`.

    backbone -> pretrain -> fit -> generate -> score
                                        \\-> segment, classify        detect (needs only the data)
"""
from __future__ import annotations

from harness.registry import Registry
from harness.runner.kind import Job, JobKind

KINDS: Registry[JobKind] = Registry("job kind", JobKind)
for _name, _entry in (
    ("backbone", "harness.runner.kinds.backbone:BACKBONE"),  # found, or fine-tuned once per data set
    ("pretrain", "harness.runner.kinds.generation:PRETRAIN"),  # a method's per-category stage (DFMGAN's stage 1)
    ("fit", "harness.runner.kinds.generation:FIT"),
    ("generate", "harness.runner.kinds.generation:GENERATE"),
    ("score", "harness.runner.kinds.score:SCORE"),
    ("segment", "harness.runner.kinds.downstream:SEGMENT"),
    ("classify", "harness.runner.kinds.downstream:CLASSIFY"),
    ("detect", "harness.runner.kinds.downstream:DETECT"),
):
    KINDS.add(_name, _entry)


def decode_job(data: dict) -> Job:
    """A job from its JSON (Job.as_dict: an executor's argument, a manifest's entry), typed by its kind."""
    return Job.from_dict(data, KINDS[data["kind"]])
