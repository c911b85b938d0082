"""`make bench-gpu`: what the `paper` profile costs per diffusion method on this machine's accelerator.

The models are random, at the papers' full widths (SD 1.5, LDM text2img-large, CLIP ViT-B/32, U2-Net; the builders
of tests/rehearsal.py with FULL_WIDTHS), so nothing is downloaded; speed and memory do not depend on the weights'
values. Each method runs at its `paper` settings (resolution, batch, scheduler, inference steps, ranks) on a
synthetic category. Measured:
- seconds per fit step: the difference of two fits of FIT_STEPS steps, so loading and saving cancel out; with the
  paper's step count, the fit's estimated time per defect type. A network trained with steps of its own (AUXILIARY:
  AnomalyDiffusion's mask generator, AnomalyXFusion's ISTR auto-encoder) is measured the same way and added;
- seconds per image: the difference of two generations, of one and of two generation batches (AnomalyDiffusion's:
  plus its mask generator's seconds per mask drawn, measured apart; a lower bound, as rejected masks are drawn again);
- the peak accelerator memory (torch.cuda.max_memory_allocated) of the fit and of the generation (on a CPU: the
  process's peak resident memory).
Each measurement follows an untimed warm-up, and a garbage collection before it resets the peak.

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

import numpy as np
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


# The networks a method trains before (or beside) its main fit, with step counts of their own: measured the same way
AUXILIARY = {"anomalydiffusion": ("mask generator", ("mask_generator", "steps")),
             "anomalyxfusion": ("ISTR auto-encoder", ("embedding", "location", "steps"))}


def overrides(name: str, built: dict, steps: int, aux_steps: int, inference_steps: int | None) -> dict:
    """The paper configuration with the fit's step counts set (and the inference steps, for a CPU's smoke run)."""
    sampling = {"inference_steps": inference_steps} if inference_steps else {}
    if name == "dualanodiff":
        return {"steps": steps, "mask": {"segmenter": "u2net", "u2net_weights": str(built["u2net"][0])}, **sampling}
    if name == "background_aware":
        return {"steps": steps, **sampling}
    if name == "anomalydiffusion":  # a random mask generator's masks are rejected: one batch, then the targets'
        return {"steps_per_defect_type": steps, **sampling,
                "mask_generator": {"steps": aux_steps, "max_batches": 1, **sampling}}
    clip, checkpoint = built["clip"]
    return {"steps_per_defect_type": steps, **sampling,
            "embedding": {"location": {"steps": aux_steps}, "clip": {"model": clip, "weights": str(checkpoint)}}}


def _settle(device: torch.device) -> None:
    """Frees what the previous measurement left, so that the next peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mask_seconds_per_draw(method, task, workdir: Path, device: torch.device) -> float:
    """AnomalyDiffusion's mask generator at generation: seconds per mask drawn (one sampling batch, less than two;
    a draw that is rejected, touching the border or empty, costs this again). The generation measured beside it
    stops after one batch (`max_batches: 1`), in both of its runs, so its difference leaves this out."""
    from safetensors.torch import load_file

    from harness.diffusion import backbone as backbones

    module = sys.modules[type(method).__module__]
    maskgen = importlib.import_module(f"{module.__package__}.maskgen")
    vectors = load_file(str(workdir / module.MASK_FILE))[DEFECT]
    frozen = backbones.load_frozen(task.backbone, device)
    settings = method._mask_settings()
    size = int(json.loads((workdir / module.MODEL_FILE).read_text())["resolution"])
    times = []
    for batches in (1, 1, 2):  # the first, untimed: a warm-up
        _settle(device)
        begin = time.perf_counter()
        maskgen.sample(frozen, vectors.to(frozen.device), {**settings, "max_batches": batches}, 10**9, size,
                       np.random.default_rng(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return (times[2] - times[1]) / int(settings["batch_size_sampling"])


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
    aux_name, aux_path = AUXILIARY.get(name, (None, ()))
    aux_base = 2

    def fit(steps: int, aux_steps: int, label: str) -> tuple[float, float, object]:
        method = load_method(name, "paper", overrides(name, built, steps, aux_steps, inference_steps))
        _settle(device)
        with peak(device) as memory:
            begin = time.perf_counter()
            fit_method(method, task, work / label)
            seconds = time.perf_counter() - begin
        return seconds, memory[0], method

    fit(1, 1, "warm-up")  # untimed: the first use of each kernel (and cuDNN's choice of algorithms)
    (short, _, _), (long, fit_peak, method) = fit(fit_steps[0], aux_base, "short"), fit(fit_steps[1], aux_base, "long")
    delta = fit_steps[1] - fit_steps[0]
    per_step = (long - short) / delta
    steps_key = "steps" if "steps" in paper.config else "steps_per_defect_type"
    paper_steps = int(paper.config[steps_key])
    estimate, aux, aux_steps = paper_steps * per_step, None, None
    if aux_name:  # the short fit again with the auxiliary network's steps raised by as many
        aux = (fit(fit_steps[0], aux_base + delta, "auxiliary")[0] - short) / delta
        aux_steps = int(_get(paper.config, aux_path))
        estimate += aux_steps * aux
    batch = int(method.config["generation_batch"])
    times = []
    for n in (batch, batch, 2 * batch):  # the first, untimed: a warm-up
        request = build_request(task, method, DEFECT, n, seed=0)
        _settle(device)
        with peak(device) as generation_peak:
            begin = time.perf_counter()
            samples = list(method.generate(request, work / "long"))
            times.append(time.perf_counter() - begin)
        assert len(samples) == n
    per_image = (times[2] - times[1]) / batch
    mask_draw = mask_seconds_per_draw(method, task, work / "long", device) if name == "anomalydiffusion" else None
    scheduler = method.config.get("scheduler", "DDIMScheduler")
    # a difference of two timings at or below zero is noise, not a speed: said, never turned into an estimate
    noisy = {what: round(value, 4) for what, value in (("fit step", per_step), ("auxiliary step", aux),
                                                       ("image", per_image)) if value is not None and value <= 0}
    fit_known = not {"fit step", "auxiliary step"} & set(noisy)
    return {"method": name, "timing_noise": noisy or None, "backbone": paper.backbone, "resolution": size,
            "batch": int(method.config["batch_size"]),
            "seconds_per_fit_step": None if "fit step" in noisy else round(per_step, 4), "paper_fit_steps": paper_steps,
            "auxiliary": aux_name,
            "auxiliary_seconds_per_step": None if aux is None or "auxiliary step" in noisy else round(aux, 4),
            "auxiliary_steps": aux_steps, "paper_fit_minutes": round(estimate / 60, 1) if fit_known else None,
            "scheduler": scheduler,
            "inference_steps": int(method.config["inference_steps"]), "generation_batch": batch,
            "seconds_per_image": None if "image" in noisy else round(per_image + (mask_draw or 0.0), 3),
            "mask_seconds_per_draw": None if mask_draw is None else round(mask_draw, 3),
            "fit_peak_gib": round(fit_peak, 2), "generation_peak_gib": round(generation_peak[0], 2)}


def _get(config: dict, path: tuple[str, ...]):
    for key in path:
        config = config[key]
    return config


def run(methods=METHODS, widths: str = "full", fit_steps: tuple[int, int] = FIT_STEPS,
        inference_steps: int | None = None, out: Path = OUT) -> dict:
    from harness.device import default_device
    from harness.io import atomic_write_json
    from harness.provenance import code_version
    from tests.rehearsal import FULL_WIDTHS, WIDTHS

    device = default_device()
    chosen = FULL_WIDTHS if widths == "full" else WIDTHS
    data = {"benchmark": "paper_gpu", "widths": widths, "device": _device_name(device),
            "torch": torch.__version__, "code": code_version()["git"], "fit_steps": list(fit_steps),
            "inference_steps": inference_steps or "paper", "methods": list(methods), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        built = models(Path(tmp), chosen)
        u2net = _u2net_module()
        real = u2net.U2Net
        u2net.U2Net = partial(real, width=built["u2net"][1])  # the segmenter builds U2Net() at the checkpoint's width
        try:
            for name in methods:
                print(f"bench-gpu: {name} ...", flush=True)
                data["rows"].append(measure(name, built, Path(tmp) / name, device, fit_steps, inference_steps))
                atomic_write_json(out, data)  # after each method: a run cut short keeps what it measured
        finally:
            u2net.U2Net = real
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
        fit = (f"{r['paper_fit_minutes']} min (" if r["paper_fit_minutes"] is not None
               else "not measured: timing noise (") + f"{r['paper_fit_steps']:,}"
        if r.get("auxiliary_steps"):
            fit += f" + {r['auxiliary_steps']:,} {r['auxiliary']} at {r['auxiliary_seconds_per_step']} s"
        image = r["seconds_per_image"]
        if image is None:
            image = "timing noise"
        elif r.get("mask_seconds_per_draw") is not None:  # a lower bound: each rejected mask is drawn again
            image = f"≥ {image} (mask draws {r['mask_seconds_per_draw']} s)"
        rows.append([r["method"], r["backbone"], r["resolution"], r["batch"], r["seconds_per_fit_step"], fit + ")",
                     f"{r['scheduler'].removesuffix('Scheduler')} {r['inference_steps']}", image,
                     r["fit_peak_gib"], r["generation_peak_gib"]])
    where = f"{data['device']}, torch {data['torch']}, code {data['code']}, random weights at {data['widths']} widths"
    noisy = [f"{r['method']} ({', '.join(f'{k} {v} s' for k, v in r['timing_noise'].items())})"
             for r in data["rows"] if r.get("timing_noise")]
    if noisy:  # a difference of two timings at or below zero: the run needs more steps
        where += f"; differences of two timings at or below zero, not speeds: {'; '.join(noisy)}"
    missing = [m for m in data.get("methods", []) if m not in {r["method"] for r in data["rows"]}]
    if missing:
        where += f"; not measured (the run stopped): {', '.join(missing)}"
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
    print(render(run(args.methods, args.widths, tuple(args.fit_steps), args.inference_steps, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
