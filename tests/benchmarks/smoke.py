"""The smoke suite's data as the benchmarks read it: splits of its categories and their normal training images,
as provision.provision takes them (the shipped tiny backbone has seen them)."""
from __future__ import annotations

from harness.data.layouts import read_category
from harness.data.splits import Split, make_split
from harness.data.synth import SynthConfig, cached
from harness.diffusion import provision
from harness.io import cached_file_hash


def smoke_data(categories: tuple[str, ...]) -> tuple[dict[str, Split], list[provision.NormalImages]]:
    root = cached(SynthConfig())
    splits = {name: make_split(read_category(root, name, dataset="synthetic")) for name in categories}
    normals = [provision.NormalImages(name, tuple(s.image for s in split.normal_train),
                                      tuple(cached_file_hash(s.image) for s in split.normal_train))
               for name, split in splits.items()]
    return splits, normals
