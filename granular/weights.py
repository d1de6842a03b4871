"""Start a search from trained weights: ``granular search SPEC --weights FILE``.

Pruning a trained model keeps what it learned, instead of learning it again during the
search, so the weights go into the plain model *before* it is traced and gated (the gated
graph copies the model's parameters). The file is read without running code
(``torch.load(weights_only=True)``, or safetensors) and must match the model exactly: a
checkpoint of another model, or of the same model with another head, is bad input and gets
one line naming what differs, not PyTorch's many-line report.

Accepted files: a ``.safetensors`` state dict; a ``.pt``/``.pth`` holding a state dict, or a
dict with it under ``state_dict`` or ``model``. For ``timm:NAME`` models the file is read by
timm's own :func:`timm.models.load_state_dict`, so timm's training checkpoints load as they
are (``state_dict_ema``/``model_ema`` preferred, ``module.`` and ``_orig_mod.`` prefixes of
DDP and ``torch.compile`` stripped).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from granular.errors import CheckpointError

__all__ = ["read_state_dict", "load_weights"]

_NESTED_KEYS = ("state_dict", "model")
_SHOWN = 3  # keys named in a message


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def read_state_dict(path: str | os.PathLike, *, timm_style: bool = False) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path``.

    Args:
        path: a ``.safetensors``, ``.pt`` or ``.pth`` file.
        timm_style: read it as timm does (EMA weights first, wrapper prefixes stripped).

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: no such file; pass a .pt, .pth or .safetensors state dict")
    try:
        if timm_style:
            from timm.models import load_state_dict
            state = load_state_dict(str(path), use_ema=True, weights_only=True)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"--weights {path} cannot be read as weights ({type(err).__name__}: "
                              f"{_first_line(err)}): save it with torch.save(model.state_dict(), FILE) "
                              f"or safetensors") from None
    if isinstance(state, dict) and not timm_style:
        for key in _NESTED_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = (f"a dict with keys {', '.join(map(str, list(state)[:_SHOWN]))}" if isinstance(state, dict) and state
                else type(state).__name__ if not isinstance(state, dict) else "an empty dict")
        raise CheckpointError(f"--weights {path} holds {what}, not a state dict of tensors: save "
                              f"model.state_dict(), or a dict with it under 'state_dict' or 'model'")
    return state


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_weights(model: nn.Module, path: str | os.PathLike, *, timm_style: bool = False) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (in place, strictly) and return it.

    Raises:
        CheckpointError: unreadable file (see :func:`read_state_dict`), keys that do not match
            (a few missing and unexpected ones named), or a tensor whose shape differs (the
            first such key and both shapes named).
    """
    state = read_state_dict(path, timm_style=timm_style)
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"--weights {path} does not match the model's keys ({'; '.join(parts)}): "
                              f"save the weights of this same model (model.state_dict())")
    for key, tensor in own.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"--weights {path} does not fit the model: {key} is {list(state[key].shape)} in the "
                                  f"file but {list(tensor.shape)} in the model; check num_classes/in_channels "
                                  f"(the data set's) and the model's settings")
    model.load_state_dict(state, strict=True)
    return model
