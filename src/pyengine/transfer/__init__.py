"""Transfer learning: freezing with explicit BatchNorm modes, gradual unfreezing, optimizer
state keyed by parameter name, a bottleneck-feature cache, and head replacement.

::

    pe.transfer.freeze(model.backbone, bn="frozen")     # BN keeps its stored statistics
    old = pe.transfer.replace_head(model, nn.Linear(512, 10), attr="fc")
    feats = pe.transfer.cache_features(model.backbone, loader, "feats.ds")   # run it once
    unfreezer = pe.transfer.GradualUnfreezer(opt, [model.layer4, model.layer3], at_epochs=[3, 6], lr=1e-4)
    named = pe.transfer.NamedOptimizerState(opt, model)  # checkpoint this instead of opt
"""

from __future__ import annotations

from pyengine.transfer.feature_cache import cache_features
from pyengine.transfer.freezing import batchnorm_layers, freeze, is_bn_frozen, trainable_parameters, unfreeze
from pyengine.transfer.gradual import GradualUnfreezer, param_group_named
from pyengine.transfer.head import replace_head
from pyengine.transfer.named_optimizer import NamedLoadResult, NamedOptimizerState

__all__ = [
    "GradualUnfreezer",
    "NamedLoadResult",
    "NamedOptimizerState",
    "batchnorm_layers",
    "cache_features",
    "freeze",
    "is_bn_frozen",
    "param_group_named",
    "replace_head",
    "trainable_parameters",
    "unfreeze",
]
