"""Replacing a pretrained model's head with one for the new task."""

from __future__ import annotations

from torch import nn


def replace_head(model: nn.Module, new_head: nn.Module, attr: str, *, match_device: bool = True) -> nn.Module:
    """Puts ``new_head`` in place of the submodule at ``attr`` and returns the old head.

    Args:
        model: The model whose head is replaced (in place).
        new_head: The new head (trainable, whatever was frozen before).
        attr: Path of the head inside the model, dotted for nesting; numeric parts index
            containers: ``"fc"`` (ResNet), ``"classifier.6"`` (VGG), ``"heads.head"`` (ViT).
        match_device: Move ``new_head`` to the device and floating dtype of the old
            head's first parameter (or buffer), so a model on GPU or in half keeps working.

    Returns:
        The replaced module.

    Raises:
        AttributeError: No submodule at ``attr`` (the message lists the top-level children).
        TypeError: ``new_head`` is not an nn.Module.
    """
    if not isinstance(new_head, nn.Module):
        raise TypeError(f"new_head must be an nn.Module, got {type(new_head).__name__}")
    parent_path, _, name = attr.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        old = parent.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise AttributeError(f"{type(model).__name__} has no submodule {attr!r}; its children are {children}") from None
    if match_device:
        ref = next(iter([*old.parameters(), *old.buffers()]), None)
        if ref is not None:
            new_head.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    setattr(parent, name, new_head)
    return old
