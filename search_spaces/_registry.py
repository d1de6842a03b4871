"""The search-space registry (``register_search_space`` and its ``list_``/``get_``/``build_``
helpers, with each space's :class:`SpaceInfo`); :mod:`granular.search_spaces` re-exports it."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch.nn as nn

from granular.errors import GranularError

__all__ = [
    "register_search_space",
    "list_search_spaces",
    "get_search_space",
    "build_search_space",
    "describe_op",
    "space_info",
    "op_order",
    "SpaceInfo",
]


class SpaceInfo(NamedTuple):
    """What the registry knows about a search space besides its builder.

    Attributes:
        describe_op: ``fn(module_path) -> {"cell": ..., "op": ..., ...} or None``.
        op_order: the op types in the order reports show them.
        reduction_cells: ``fn(n_cells) -> indices`` of the reduction cells, or None.
    """

    describe_op: Callable[[str], dict | None] | None = None
    op_order: tuple[str, ...] = ()
    reduction_cells: Callable[[int], Sequence[int]] | None = None


class _Entry(NamedTuple):
    builder: Callable[..., nn.Module]
    presets: dict[str, dict]
    default_preset: str | None
    info: SpaceInfo = SpaceInfo()


_SEARCH_SPACES: dict[str, _Entry] = {}


def register_search_space(name: str, *, presets: Mapping[str, Mapping] | None = None,
                          default_preset: str | None = None,
                          describe_op: Callable[[str], dict | None] | None = None,
                          op_order: Sequence[str] = (),
                          reduction_cells: Callable[[int], Sequence[int]] | None = None) -> Callable:
    """Decorator that registers a search-space builder under ``name``.

    Args:
        name: Registry name; must not contain ``:``.
        presets: Optional ``{preset: builder kwargs}``, resolvable as ``name:preset``.
        default_preset: Preset used for the bare ``name``; ``None`` means the builder's own
            defaults.
        describe_op: Where a module path lies in the space (see :class:`SpaceInfo`).
        op_order: The space's op types, in the order reports show them.
        reduction_cells: The indices of the reduction cells of a net of ``n`` cells.

    Returns:
        A decorator that registers ``fn`` and returns it unchanged.

    Raises:
        ValueError: If ``name`` contains ``:`` or ``default_preset`` is not a preset.
    """
    if ":" in name or not name:
        raise ValueError(f"search space name must be non-empty and contain no ':', got {name!r}")
    presets = {k: dict(v) for k, v in (presets or {}).items()}
    if default_preset is not None and default_preset not in presets:
        raise ValueError(f"default_preset {default_preset!r} of {name!r} is not a preset")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _SEARCH_SPACES:
            warnings.warn(f"overwriting search space {name!r}", stacklevel=2)
        _SEARCH_SPACES[name] = _Entry(fn, presets, default_preset,
                                      SpaceInfo(describe_op, tuple(op_order), reduction_cells))
        return fn

    return decorator


def list_search_spaces() -> list[str]:
    """All resolvable spec strings, sorted: each name, then each ``name:preset``."""
    specs = []
    for name in sorted(_SEARCH_SPACES):
        specs.append(name)
        specs.extend(f"{name}:{p}" for p in sorted(_SEARCH_SPACES[name].presets))
    return specs


def get_search_space(spec: str) -> Callable[..., nn.Module]:
    """Resolve a spec (``name`` or ``name:preset``) to a builder.

    Args:
        spec: The spec string.

    Returns:
        ``builder(num_classes, in_channels, **overrides) -> nn.Module`` with the preset's
        keyword arguments bound (overrides passed at call time win).

    Raises:
        GranularError: If the name or the preset is unknown (one-line message listing the
            known specs).
    """
    name, sep, preset = str(spec).strip().partition(":")
    entry = _SEARCH_SPACES.get(name)
    if entry is None or (sep and preset not in entry.presets):
        what = "search space" if entry is None else "preset of search space"
        raise GranularError(f"unknown {what} {spec!r}; known: {', '.join(list_search_spaces())}")
    if not sep:
        preset = entry.default_preset
    if preset is None:
        return entry.builder
    return functools.partial(entry.builder, **entry.presets[preset])


def build_search_space(spec: str, num_classes: int, in_channels: int,
                       **overrides) -> nn.Module:
    """Build the super-net named by ``spec``.

    Args:
        spec: ``name`` or ``name:preset`` (see :func:`list_search_spaces`).
        num_classes: Classifier outputs.
        in_channels: Input image channels.
        **overrides: Builder keyword arguments (for ``darts``: ``cells``, ``C``, ``nodes``,
            ``stem_multiplier``); they win over the preset.

    Returns:
        The freshly initialised model.

    Raises:
        GranularError: If the spec is unknown or an override is not accepted by the builder.
    """
    builder = get_search_space(spec)
    try:
        inspect.signature(builder).bind(num_classes, in_channels, **overrides)
    except TypeError as e:
        raise GranularError(f"bad overrides for search space {spec!r}: {e}") from None
    return builder(num_classes, in_channels, **overrides)


def space_info(spec: str) -> Optional[SpaceInfo]:
    """The :class:`SpaceInfo` of the space a spec names (``name`` or ``name:preset``), or None
    when the spec is not a registered space (a ``model.py``, a zoo model)."""
    entry = _SEARCH_SPACES.get(str(spec).strip().partition(":")[0])
    return entry.info if entry is not None else None


def op_order() -> list[str]:
    """Every registered space's op types, in registration and display order."""
    out: list[str] = []
    for entry in _SEARCH_SPACES.values():
        out.extend(op for op in entry.info.op_order if op not in out)
    return out


def describe_op(module_path: str) -> dict | None:
    """Where a module path lies in a search space: ``{"cell": ..., "op": ...}`` (plus ``edge``
    for DARTS), or None outside any registered space's candidate ops. Reports group by these."""
    seen = set()
    for entry in _SEARCH_SPACES.values():
        describe = entry.info.describe_op
        if describe is None or describe in seen:
            continue
        seen.add(describe)
        found = describe(module_path)
        if found:
            return found
    return None
