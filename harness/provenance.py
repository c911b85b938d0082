"""What a result was made with: the code's version and the machine (for run manifests and the shipped backbone)."""
from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

from harness.paths import REPO_ROOT


def code_version() -> dict:
    """The git commit of the code (with a dirty flag), and the package version."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else False
    return {"git": sha[:12] + ("+dirty" if dirty else "") if sha else "unknown", "package": package_version("defectbench")}


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def machine() -> dict:
    """Where it ran: what times and numbers depend on."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return {"cpu": capabilities.get("cpu_name") or platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"), "python": platform.python_version(),
            "os": platform.platform()}
