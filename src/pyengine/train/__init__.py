"""Training: virtual epochs, the Trainer, early stopping, and useful-overfitting checks."""

from pyengine.train.callbacks import Callback
from pyengine.train.early_stopping import EarlyStopping
from pyengine.train.heat_equation import HeatEquationData, heat_equation, heat_solution
from pyengine.train.overfit import OverfitReport, overfit_batch
from pyengine.train.trainer import Trainer
from pyengine.train.virtual_epochs import VirtualEpochs
from pyengine.train.whole_domain import WholeDomainReport, fit_whole_domain, max_abs_error

__all__ = [
    "Callback",
    "EarlyStopping",
    "HeatEquationData",
    "OverfitReport",
    "Trainer",
    "VirtualEpochs",
    "WholeDomainReport",
    "fit_whole_domain",
    "heat_equation",
    "heat_solution",
    "max_abs_error",
    "overfit_batch",
]
