"""Training: virtual epochs, the Trainer, early stopping, and useful-overfitting checks."""

from pyengine.train.callbacks import Callback
from pyengine.train.early_stopping import EarlyStopping
from pyengine.train.trainer import Trainer
from pyengine.train.virtual_epochs import VirtualEpochs

__all__ = ["Callback", "EarlyStopping", "Trainer", "VirtualEpochs"]
