"""Registry of search spaces: super-nets that granular prunes.

A search space is a builder ``fn(num_classes, in_channels, **overrides) -> nn.Module``
registered under a name with :func:`register_search_space` (the timm ``register_model``
pattern: a private module-level dict, a warning on overwrite, ``list_*`` and ``get_*``
helpers). A builder may carry named presets; a spec string is ``name`` (the default preset,
if any) or ``name:preset``. Overrides given to the builder win over preset values.

Registered here: ``darts`` (the DARTS search network of Liu et al. 2019, arXiv:1806.09055,
as searched by MG-DARTS), presets ``tiny``, ``small`` (the default) and ``large``; and
``mobilenet`` (``search_spaces/mobilenet.py``: the journal paper's 17-layer MobileNet-like
space, described by block strings), presets ``imagenet`` (the default) and ``tiny``.

Each entry also carries what reports need to know about the space: how to describe a module
path inside a candidate op (``describe_op``: its cell, op type and edge), the op types in
display order (``op_order``), and which cells are reduction cells (``reduction_cells``).

Example::

    from granular.search_spaces import build_search_space
    net = build_search_space("darts:tiny", num_classes=10, in_channels=1)
"""

from __future__ import annotations

from granular.search_spaces import _registry
from granular.search_spaces._registry import (SpaceInfo, build_search_space, describe_op, get_search_space,
                                              list_search_spaces, op_order, register_search_space, space_info)

__all__ = list(_registry.__all__)

# Importing the space modules registers them.
from granular.search_spaces import darts as _darts  # noqa: E402,F401
from granular.search_spaces import mobilenet as _mobilenet  # noqa: E402,F401
