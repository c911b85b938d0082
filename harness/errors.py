"""The errors DefectBench raises for bad input: each names the file or key and what is wrong."""
from __future__ import annotations

from pathlib import Path


class DefectBenchError(Exception):
    """Base class; the CLI prints these as one line and exits with status 2."""


class DataError(DefectBenchError):
    """A data set on disk is missing something or holds something unreadable."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConfigError(DefectBenchError):
    """A config, suite or command-line value is unknown or malformed."""


class MethodError(DefectBenchError):
    """A method directory is broken or a method was asked for something it cannot do."""


class DiskFullError(DefectBenchError):
    """A file could not be written for want of space; what was finished before is kept."""


class WeightsError(DefectBenchError):
    """Pretrained weights are needed, cannot be found, and the profile forbids random ones."""


class DataWarning(UserWarning):
    """The data or a split lacks something a metric needs (said once per run, recorded in the manifest)."""
