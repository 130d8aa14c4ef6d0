"""What every integration module shares: the record of the attributes it changed, so that patch() is idempotent
and unpatch() restores exactly what was there, and a descriptor for attributes that instances hold themselves."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable

_MISSING = object()

# (owner, attribute name, replacement, description): one change patch() makes. With owner None, replacement
# is an action instead (a registration with another library's registry): called, it returns its undo.
Target = tuple[object, str, object, str]


def import_or_explain(module: str, package: str):
    """importlib.import_module(module), or an ImportError saying which package patch() needs."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"patch() needs {package} ({module} could not be imported: {error})") from error


class Patches:
    """The changes an integration makes, from `targets()` (evaluated at patch time, so that a module imported
    late is still found), and what was there before each."""

    def __init__(self, targets: Callable[[], Iterable[Target]]):
        self._targets = targets
        self._applied: list[tuple[object, str, object, str]] = []

    def patch(self) -> list[str]:
        """Applies every change; returns what was swapped (dotted names). Calling it again while patched
        changes nothing."""
        if not self._applied:
            try:
                for owner, name, replacement, description in self._targets():
                    if owner is None:
                        self._applied.append((None, name, replacement(), description))
                        continue
                    before = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
                    self._applied.append((owner, name, before, description))
                    setattr(owner, name, replacement)
            except BaseException:
                self.unpatch()
                raise
        return self.patched_targets()

    def unpatch(self) -> None:
        """Restores every attribute patch() changed, in reverse order; a no-op when not patched."""
        while self._applied:
            owner, name, before, _ = self._applied.pop()
            if owner is None:
                before()  # the action's undo
            elif before is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, before)

    def is_patched(self) -> bool:
        return bool(self._applied)

    def patched_targets(self) -> list[str]:
        return [description for *_, description in self._applied]

    def interface(self):
        """(patch, unpatch, patched, is_patched, patched_targets): what each integration module exports."""
        return self.patch, self.unpatch, self.patched, self.is_patched, self.patched_targets

    @contextlib.contextmanager
    def patched(self):
        """patch() for the duration of a block; only unpatches on exit if it was the one that patched."""
        already = self.is_patched()
        self.patch()
        try:
            yield self.patched_targets()
        finally:
            if not already:
                self.unpatch()


class InstanceAttributeSwap:
    """A class attribute standing in for one that instances keep in their own __dict__ (a data descriptor, so
    it is consulted first): a read gives `swap(instance, stored)`, or `missing(instance)` when the instance
    holds none (AttributeError without `missing`). Writes and deletes go to the instance as before, so taking
    the descriptor off the class leaves every instance exactly as its library left it. On the class itself it
    reads as `on_class`."""

    def __init__(self, name: str, swap: Callable, missing: Callable | None = None, on_class=None):
        self.name, self.swap, self.missing, self.on_class = name, swap, missing, on_class

    def __get__(self, instance, owner=None):
        if instance is None:
            return self if self.on_class is None else self.on_class
        try:
            stored = instance.__dict__[self.name]
        except KeyError:
            if self.missing is None:
                raise AttributeError(self.name) from None
            return self.missing(instance)
        return self.swap(instance, stored)

    def __set__(self, instance, value):
        instance.__dict__[self.name] = value

    def __delete__(self, instance):
        del instance.__dict__[self.name]
