"""Swap torch.nn.Conv2d layers of a model for fastconv.nn.Conv2d."""
from __future__ import annotations

import torch

from .nn import Conv2d


def convert(model: torch.nn.Module, algo: str = "auto") -> torch.nn.Module:
    """Replaces, in place, every module whose type is exactly torch.nn.Conv2d with a
    fastconv.nn.Conv2d that shares its parameters; returns the model (or the replacement if
    ``model`` itself is a Conv2d). Subclasses of Conv2d are left alone: their forward may
    differ from Conv2d's."""
    if type(model) is torch.nn.Conv2d:
        return Conv2d.from_torch(model, algo)
    for name, child in model.named_children():
        if type(child) is torch.nn.Conv2d:
            setattr(model, name, Conv2d.from_torch(child, algo))
        else:
            convert(child, algo)
    return model
