"""`make bench-gpu`: what the `paper` profile costs per diffusion method on this machine's accelerator.

The models are random, at the papers' full widths (SD 1.5, LDM text2img-large, CLIP ViT-B/32, U2-Net; the builders
of tests/rehearsal.py with FULL_WIDTHS), so nothing is downloaded; speed and memory do not depend on the weights'
values. Each method runs at its `paper` settings (resolution, batch, scheduler, inference steps, ranks) on a
synthetic category. Measured:
- seconds per fit step: the difference of two fits of FIT_STEPS steps, so loading and saving cancel out; with the
  paper's step count, the fit's estimated time per defect type (AnomalyDiffusion's mask generator: its own steps,
  measured the same way);
- seconds per image: the difference of two generations, of one and of two generation batches;
- the peak accelerator memory (torch.cuda.max_memory_allocated) of the fit and of the generation (on a CPU: the
  process's peak resident memory).

Writes results/bench/paper_gpu.json (tracked: CI has no GPU); `--render` prints the README's table from it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from tabulate import tabulate

OUT = Path("results/bench/paper_gpu.json")
METHODS = ("dualanodiff", "background_aware", "anomalydiffusion", "anomalyxfusion")
FIT_STEPS = (5, 25)
DEFECT = "stain"  # a washer defect type: one per method
README_START, README_END = "<!-- bench-gpu: rendered from results/bench/paper_gpu.json -->", "<!-- /bench-gpu -->"
NOT_MEASURED = ("Not yet measured: no session with a GPU has run `make bench-gpu` yet "
                "(it writes results/bench/paper_gpu.json, and this table is rendered from it).")
HEADERS = ("method", "backbone", "px", "batch", "s / fit step", "paper fit (steps)", "sampler", "s / image",
           "fit peak GiB", "generation peak GiB")


@contextlib.contextmanager
def peak(device: torch.device) -> Iterator[list[float]]:
    """Yields [peak GiB] (filled after the block): allocated accelerator memory, or resident memory on a CPU."""
    out: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.append(torch.cuda.max_memory_allocated() / 2**30)
        return
    from tests.benchmarks.memory import peak_memory

    with peak_memory() as resident:
        yield out
    out.append(resident[0] / 1024)


def models(folder: Path, widths: dict) -> dict:
    """The random models every method needs, saved as the loaders read them."""
    from harness.diffusion.backbone import split_words
    from harness.methods import load_method
    from tests.rehearsal import clip_vit_b_32, ldm_text2img_large, stable_diffusion_15

    paper = load_method("anomalydiffusion", "paper").config
    words = split_words(" ".join(paper["templates"] + [paper["embedding"]["init_word"],
                                                       paper["mask_generator"]["init_word"]]))
    u2net = _u2net_module()
    width = 1.0 if widths["clip"] == "full" else 0.125
    torch.manual_seed(0)
    torch.save(u2net.U2Net(width=width).state_dict(), folder / "u2net.pth")
    clip, checkpoint = clip_vit_b_32(folder / "clip", widths=widths)
    return {"sd15": stable_diffusion_15(folder / "sd15", widths=widths),
            "ldm": ldm_text2img_large(folder / "ldm", words, widths=widths),
            "clip": (clip, checkpoint), "u2net": (folder / "u2net.pth", width)}


def _u2net_module():
    from harness.methods import get_method_info

    return importlib.import_module(sys.modules[get_method_info("dualanodiff").cls.__module__].__package__ + ".u2net")


def overrides(name: str, built: dict, steps: int, mask_steps: int, inference_steps: int | None) -> dict:
    """The paper configuration with the fit's step counts set (and the inference steps, for a CPU's smoke run)."""
    sampling = {"inference_steps": inference_steps} if inference_steps else {}
    if name == "dualanodiff":
        return {"steps": steps, "mask": {"segmenter": "u2net", "u2net_weights": str(built["u2net"][0])}, **sampling}
    if name == "background_aware":
        return {"steps": steps, **sampling}
    if name == "anomalydiffusion":  # a random mask generator's masks are rejected: one batch, then the targets'
        return {"steps_per_defect_type": steps, **sampling,
                "mask_generator": {"steps": mask_steps, "max_batches": 1, **sampling}}
    clip, checkpoint = built["clip"]
    return {"steps_per_defect_type": steps, **sampling,
            "embedding": {"location": {"steps": 2}, "clip": {"model": clip, "weights": str(checkpoint)}}}


def measure(name: str, built: dict, work: Path, device: torch.device, fit_steps: tuple[int, int],
            inference_steps: int | None) -> dict:
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.data.synth import SynthConfig, cached
    from harness.generation import fit_method
    from harness.methods import load_method
    from harness.profiles import get_profile
    from harness.tasks import build_request, build_task

    paper = load_method(name, "paper")
    backbone = built["sd15"] if paper.backbone == "stable-diffusion-v1-5" else built["ldm"]
    size = paper.working_resolution(get_profile("paper").resolution)
    split = make_split(read_category(cached(SynthConfig()), "washer", dataset="synthetic"))
    task = build_task(split, [DEFECT], size, seed=0)
    task.backbone = backbone

    def fit(steps: int, mask_steps: int, label: str) -> tuple[float, float, object]:
        method = load_method(name, "paper", overrides(name, built, steps, mask_steps, inference_steps))
        with peak(device) as memory:
            begin = time.perf_counter()
            fit_method(method, task, work / label)
            seconds = time.perf_counter() - begin
        return seconds, memory[0], method

    (short, _, _), (long, fit_peak, method) = fit(fit_steps[0], 2, "short"), fit(fit_steps[1], 2, "long")
    per_step = (long - short) / (fit_steps[1] - fit_steps[0])
    steps_key = "steps" if "steps" in paper.config else "steps_per_defect_type"
    paper_steps = int(paper.config[steps_key])
    estimate, mask = paper_steps * per_step, None
    if name == "anomalydiffusion":  # its mask generator's textual inversion: steps of its own
        masks = paper.config["mask_generator"]["steps"]
        mask_short, mask_long = (fit(fit_steps[0], m, f"mask{m}")[0] for m in (2, 2 + fit_steps[1] - fit_steps[0]))
        mask = (mask_long - mask_short) / (fit_steps[1] - fit_steps[0])
        estimate += masks * mask
    batch = int(method.config["generation_batch"])
    times = []
    for n in (batch, 2 * batch):
        request = build_request(task, method, DEFECT, n, seed=0)
        with peak(device) as generation_peak:
            begin = time.perf_counter()
            samples = list(method.generate(request, work / "long"))
            times.append(time.perf_counter() - begin)
        assert len(samples) == n
    scheduler = method.config.get("scheduler", "DDIMScheduler")
    return {"method": name, "backbone": paper.backbone, "resolution": size, "batch": int(method.config["batch_size"]),
            "seconds_per_fit_step": round(per_step, 4), "paper_fit_steps": paper_steps,
            "mask_generator_seconds_per_step": None if mask is None else round(mask, 4),
            "mask_generator_steps": None if mask is None else int(paper.config["mask_generator"]["steps"]),
            "paper_fit_minutes": round(estimate / 60, 1), "scheduler": scheduler,
            "inference_steps": int(method.config["inference_steps"]), "generation_batch": batch,
            "seconds_per_image": round((times[1] - times[0]) / batch, 3), "fit_peak_gib": round(fit_peak, 2),
            "generation_peak_gib": round(generation_peak[0], 2)}


def run(methods=METHODS, widths: str = "full", fit_steps: tuple[int, int] = FIT_STEPS,
        inference_steps: int | None = None, out: Path = OUT) -> dict:
    from harness.device import default_device
    from harness.io import atomic_write_json
    from harness.provenance import code_version
    from tests.rehearsal import FULL_WIDTHS, WIDTHS

    device = default_device()
    chosen = FULL_WIDTHS if widths == "full" else WIDTHS
    with tempfile.TemporaryDirectory() as tmp:
        built = models(Path(tmp), chosen)
        u2net = _u2net_module()
        real = u2net.U2Net
        u2net.U2Net = partial(real, width=built["u2net"][1])  # the segmenter builds U2Net() at the checkpoint's width
        try:
            rows = []
            for name in methods:
                print(f"bench-gpu: {name} ...", flush=True)
                rows.append(measure(name, built, Path(tmp) / name, device, fit_steps, inference_steps))
        finally:
            u2net.U2Net = real
    data = {"benchmark": "paper_gpu", "widths": widths, "device": _device_name(device),
            "torch": torch.__version__, "code": code_version()["git"], "fit_steps": list(fit_steps),
            "inference_steps": inference_steps or "paper", "rows": rows}
    atomic_write_json(out, data)
    return data


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def render(data: dict | None) -> str:
    """The README's table (Markdown) from the benchmark's JSON; NOT_MEASURED where there is none."""
    if data is None:
        return NOT_MEASURED
    rows = []
    for r in data["rows"]:
        fit = f"{r['paper_fit_minutes']} min ({r['paper_fit_steps']:,}"
        if r.get("mask_generator_steps"):
            fit += f" + {r['mask_generator_steps']:,} mask generator at {r['mask_generator_seconds_per_step']} s"
        rows.append([r["method"], r["backbone"], r["resolution"], r["batch"], r["seconds_per_fit_step"], fit + ")",
                     f"{r['scheduler'].removesuffix('Scheduler')} {r['inference_steps']}", r["seconds_per_image"],
                     r["fit_peak_gib"], r["generation_peak_gib"]])
    where = f"{data['device']}, torch {data['torch']}, code {data['code']}, random weights at {data['widths']} widths"
    return f"{tabulate(rows, headers=HEADERS, tablefmt='github')}\n\n({where}.)"


def readme_block(readme: str) -> str:
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[start:end].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--widths", choices=("full", "rehearsal"), default="full",
                        help="full: the papers' models (a GPU); rehearsal: tests/rehearsal.py's (a CPU smoke run)")
    parser.add_argument("--fit-steps", nargs=2, type=int, default=FIT_STEPS)
    parser.add_argument("--inference-steps", type=int, default=None, help="default: each method's paper setting")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", action="store_true", help="print the README's table from --out; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.out.read_text()) if args.out.is_file() else None))
        return 0
    data = run(args.methods, args.widths, tuple(args.fit_steps), args.inference_steps, args.out)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
