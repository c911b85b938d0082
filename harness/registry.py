"""One small registry for every table of named things: job kinds, methods, detectors, downstream models, IC-LPIPS
presets, profiles and split protocols.

An entry is an object, or a lazy `"module:attribute"` string imported on first use (so that listing names never
imports torch). A name registered twice is an error, not a silent overwrite; an unknown name is a ConfigError that
lists the known ones and suggests the nearest.

    PROFILES = Registry("profile", Profile)
    PROFILES.add("tiny", Profile(...))
    PROFILES.add("paper", "harness.profiles:PAPER")   # lazy
    PROFILES["tiny"]; "tiny" in PROFILES; PROFILES.names()
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from harness.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, base: type | tuple[type, ...] | None = None, hint: str = ""):
        self.what = what  # in messages: "unknown {what} 'x'"
        self.base = base  # entries must be instances of it (checked when they are resolved)
        self.hint = hint  # appended to the unknown-name message (where the names come from)
        self._entries: dict[str, T | str] = {}

    def add(self, name: str, entry: T | str, replace: bool = False) -> T | str:
        """Register `entry` (or a lazy "module:attribute") under `name`; a second name raises unless `replace`."""
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise ConfigError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """As a decorator: `@KINDS.register("score")`."""
        def add(entry: T) -> T:
            self.add(name, entry)
            return entry
        return add

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = _resolve(entry)
        if self.base is not None and not isinstance(entry, self.base):
            raise ConfigError(f"{self.what} {name!r} is a {type(entry).__name__}, not a {_names(self.base)}")
        return entry

    def get(self, name: str, default: T | None = None) -> T | None:
        return self[name] if name in self._entries else default

    def unknown(self, name: str) -> str:
        """The message for a name nobody registered: the known names, and the nearest one."""
        return unknown_name(self.what, name, list(self._entries)) + self.hint

    def check(self, name: str, where: str = "") -> str:
        """`name` if it is registered, else a ConfigError that says where the name came from."""
        if name not in self._entries:
            raise ConfigError(f"{where}: {self.unknown(name)}" if where else self.unknown(name))
        return name

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in list(self._entries):
            yield name, self[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def unknown_name(what: str, name: str, known: list[str]) -> str:
    """'unknown <what> <name>; did you mean <nearest>? (known: ...)' for a name none of `known` is."""
    near = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown {what} {name!r}{hint} (known: {', '.join(known) or 'none'})"


def _resolve(entry: str) -> object:
    module, _, attribute = entry.partition(":")
    if not attribute:
        raise ConfigError(f"registry entry {entry!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)


def _names(base: type | tuple[type, ...]) -> str:
    return " or ".join(b.__name__ for b in (base if isinstance(base, tuple) else (base,)))
