"""DFMGAN's stage 1 as shipped for the synthetic categories at `tiny`: StyleGAN2 trained once per category (13 min
on 2 cores) and committed, so that the demo runs stage 2 only, as the diffusion methods fine-tune the shipped
backbone. `pretrain` takes it only where it was made from the same pixels with the same settings (the card's
`normals` and `settings`); anywhere else stage 1 is trained.

    python -m methods.dfmgan.shipped tray [weave ...]    # train and write stage1/tiny/<category>/

A folder holds stage1.safetensors ({g_ema, d}), card.json (what it was made from and how: settings, the normal
images' pixel hashes, seed, steps, seconds, commit, machine, the loss history) and samples.png (16 draws of G_ema).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from harness.io import atomic_directory, sha256_json

SHIPPED = Path(__file__).parent / "stage1"
CARD, WEIGHTS, GRID = "card.json", "stage1.safetensors", "samples.png"
DATA = {"layout": "synthetic", "synth_seed": 0, "protocol": "clean-thirds", "fold": 0, "seed": 0}


def normals_digest(images: list[np.ndarray]) -> str:
    """The normal training images by their pixels (uint8, as the method sees them), in any order."""
    return sha256_json(sorted(hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
                              for image in images))[:20]


def find(profile: str, category: str, images: list[np.ndarray], settings: dict) -> Path | None:
    """The shipped stage 1 made from exactly these normal images with exactly these settings, if there is one."""
    folder = SHIPPED / profile / category
    if not (folder / CARD).is_file():
        return None
    card = json.loads((folder / CARD).read_text())
    if card["normals"] != normals_digest(images) or card["settings"] != json.loads(json.dumps(settings)):
        return None
    return folder


def samples_grid(g_ema, path: Path, n: int = 16, seed: int = 1) -> None:
    import torch
    from PIL import Image

    from harness.diffusion.latents import to_uint8

    with torch.no_grad():
        z = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, g_ema.shape.z_dim))).float()
        images = to_uint8(g_ema(z, noise="const")[0])
    rows = [np.concatenate(list(images[i:i + 8]), axis=1) for i in range(0, n, 8)]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def make(category: str, profile_name: str = "tiny", out: Path = SHIPPED) -> Path:
    """Train stage 1 on `category` of the synthetic set, as a run of the demo or smoke suite would, and write its
    folder (replacing one there)."""
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.data.synth import SynthConfig, cached
    from harness.methods import discover
    from harness.profiles import get_profile
    from harness.provenance import code_version, machine
    from harness.tasks import build_task

    from .method import DFMGAN, gan_shape, load, stage1_settings

    profile = get_profile(profile_name)
    info = discover()["dfmgan"]
    config = {**info.config(profile), "shipped_stage1": False}
    method = DFMGAN(config, profile)
    root = cached(SynthConfig(seed=DATA["synth_seed"]))
    split = make_split(read_category(root, category, dataset="synthetic"), DATA["protocol"], DATA["fold"])
    task = build_task(split, [], method.working_resolution(profile.resolution), DATA["seed"])
    final = out / profile_name / category
    with atomic_directory(final, overwrite=True) as folder:
        method.pretrain(task, folder)
        record = json.loads((folder / "dfmgan.json").read_text())
        (folder / "dfmgan.json").unlink()
        card = {"category": category, "profile": profile_name, "data": DATA, "images": len(task.normals),
                "normals": normals_digest([item.image for item in task.normals]),
                "settings": stage1_settings(config), "command": " ".join(["python -m methods.dfmgan.shipped",
                                                                                 *sys.argv[1:]]),
                "code": code_version(), "machine": machine(), **record}
        (folder / CARD).write_text(json.dumps(card, indent=1) + "\n")
        from .networks import Generator

        g = Generator(gan_shape(config, task.resolution)).eval().requires_grad_(False)
        load(folder / WEIGHTS, {"g_ema": g})
        samples_grid(g, folder / GRID)
    return final


def copy_to(folder: Path, workdir: Path) -> dict:
    """Put the shipped stage 1 where `fit` reads it; what goes into the pretrain record."""
    shutil.copyfile(folder / WEIGHTS, workdir / WEIGHTS)
    card = json.loads((folder / CARD).read_text())
    return {"stage": 1, "shipped": str(folder.relative_to(SHIPPED.parent.parent.parent)),
            **{key: card[key] for key in ("images", "steps", "batch", "ada_p", "seconds", "code")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m methods.dfmgan.shipped", description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+")
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args(argv)
    for category in args.categories:
        print(f"stage 1 shipped: {make(category, args.profile)}")


if __name__ == "__main__":
    main()
