"""Freezing and unfreezing modules, with an explicit BatchNorm mode.

PyTorch has no "frozen BatchNorm" (pytorch#66073): ``requires_grad_(False)`` stops the
affine parameters, but a BatchNorm layer in train mode still normalises with batch
statistics and keeps overwriting its running mean and variance, so a "frozen" backbone
drifts as soon as ``model.train()`` is called. ``freeze(module, bn="frozen")`` fixes that.

Mechanism: each BatchNorm layer gets a forward pre-hook that sets ``training = False`` on
that layer just before it runs. ``model.train()`` may set the flag back to True, but the
next forward turns it off again, so the layer always uses (and never updates) its stored
statistics. Hooks survive ``model.train()``, ``copy.deepcopy`` and ``load_state_dict``; they
are not part of a state_dict, so a checkpoint restores into a model that was frozen the
same way when it was built (freezing is structure, like the layers themselves).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_MODES = ("frozen", "train")


def _use_running_stats(module: nn.Module, args: tuple) -> None:
    # Runs before every forward of a frozen BatchNorm: inference mode for this layer only.
    module.training = False


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, lazy) in ``module``, itself included."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def is_bn_frozen(layer: nn.Module) -> bool:
    """True when ``layer`` is a BatchNorm layer held on its stored statistics by :func:`freeze`."""
    return any(hook is _use_running_stats for hook in layer._forward_pre_hooks.values())


def _set_bn_mode(layer: _BatchNorm, bn: str, parent_training: bool) -> None:
    if bn == "frozen":
        if not layer.track_running_stats:
            warnings.warn(
                f"{type(layer).__name__} has track_running_stats=False, so it has no stored statistics to "
                "freeze; it keeps normalising with batch statistics",
                stacklevel=3,
            )
            return
        if not is_bn_frozen(layer):
            layer.register_forward_pre_hook(_use_running_stats)
        layer.training = False
    else:
        # Remove by identity rather than through a stored handle: a handle copied by
        # deepcopy would still point at the original layer's hook table.
        for key, hook in list(layer._forward_pre_hooks.items()):
            if hook is _use_running_stats:
                del layer._forward_pre_hooks[key]
        layer.training = parent_training


def _check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")


def freeze(module: nn.Module, bn: str = "frozen") -> nn.Module:
    """Stops training every parameter of ``module``, and sets how its BatchNorm layers behave.

    Args:
        module: The module to freeze (for example a pretrained backbone).
        bn: "frozen": BatchNorm layers use and keep their stored running statistics even
            while the model is in train mode, across later ``model.train()`` calls (what
            Keras does for ``trainable=False``). "train": BatchNorm layers follow the
            model's mode as usual: in train mode they normalise with batch statistics and
            update their running statistics (only their affine parameters are frozen).

    Returns:
        ``module``, for chaining.

    Raises:
        ValueError: ``bn`` is not "frozen" or "train".
    """
    _check_bn(bn)
    if not isinstance(module, nn.Module):
        raise TypeError(f"freeze() needs an nn.Module, got {type(module).__name__}")
    module.requires_grad_(False)
    for layer in batchnorm_layers(module):
        _set_bn_mode(layer, bn, module.training)
    return module


def unfreeze(module: nn.Module, bn: str = "train") -> nn.Module:
    """Makes every parameter of ``module`` trainable again.

    Parameters that become trainable are not in any optimizer yet: add them (a new param
    group), or let :class:`pyengine.transfer.GradualUnfreezer` do it.

    Args:
        module: The module to unfreeze.
        bn: "train" (default): BatchNorm layers follow the model's mode again, taking the
            mode of ``module``. "frozen": their affine parameters train but they keep using
            their stored statistics (the usual advice when fine-tuning on small batches).

    Returns:
        ``module``, for chaining.

    Raises:
        ValueError: ``bn`` is not "frozen" or "train".
    """
    _check_bn(bn)
    if not isinstance(module, nn.Module):
        raise TypeError(f"unfreeze() needs an nn.Module, got {type(module).__name__}")
    module.requires_grad_(True)
    for layer in batchnorm_layers(module):
        _set_bn_mode(layer, bn, module.training)
    return module


def trainable_parameters(module: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that require gradients (what an optimizer should get)."""
    return [p for p in module.parameters() if p.requires_grad]
