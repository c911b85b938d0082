"""Which data a job reads (by content: part of its key) and where that data lies (not part of it).

A job's parameters name a category's split by its manifest hash, never by its folder; its `where` gives the
folder on this machine. `SourceRef` joins the two and re-reads the split in the job's process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from harness.data.layouts import read_category
from harness.data.splits import Split, make_split
from harness.errors import DataError


@dataclass(frozen=True)
class Source:
    """A category's split by content: what a job's key holds of its data (the base of its params)."""

    dataset: str
    category: str
    protocol: str
    fold: int
    split_hash: str  # every listed file's bytes and the captions (Split.manifest_hash)
    require_captions: bool

    @classmethod
    def of(cls, dataset: str, split: Split, require_captions: bool) -> "Source":
        return cls(dataset, split.category.name, split.protocol, split.fold, split.manifest_hash, require_captions)

    def source_fields(self) -> dict:
        """Just the Source fields (to build a kind's params, which extend Source)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Source)}


@dataclass(frozen=True)
class DataWhere:
    """Where a data set lies on this machine (the base of a job's `where`)."""

    root: str
    captions: str | None = None

    def data_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DataWhere)}


@dataclass(frozen=True)
class SourceRef:
    source: Source
    where: DataWhere

    def load(self, cache: dict) -> Split:
        """Re-read the category and re-split it; the content hash must match the plan's, or the data changed."""
        s, w = self.source, self.where
        key = ("split", w.root, s.category, s.protocol, s.fold, w.captions)
        if key not in cache:
            category = read_category(Path(w.root), s.category, captions=w.captions,
                                     require_captions=s.require_captions, dataset=s.dataset)
            cache[key] = make_split(category, s.protocol, s.fold)
        split = cache[key]
        if split.manifest_hash != s.split_hash:
            raise DataError(split.category.root, "the data changed since the suite was planned (split manifest hash "
                                                 "differs); run the suite again")
        return split


def load_split(params: Source, where: DataWhere, cache: dict) -> Split:
    """The split a job's params name, from where its `where` says the data lies."""
    return SourceRef(Source(**Source.source_fields(params)), DataWhere(**DataWhere.data_fields(where))).load(cache)
