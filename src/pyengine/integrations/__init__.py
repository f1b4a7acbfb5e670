"""pyengine inside other frameworks.

Each integration is an optional extra (`pip install "pyengine[optuna]"`, ...) and a module of
its own, imported by name (`from pyengine.integrations.optuna import PyEngineSampler`); the
core never imports these libraries, and this package imports none of its modules.

- `optuna`: `PyEngineSampler`, pyengine's Bayesian optimiser as an Optuna sampler.
- `lightning`: `PyEngineCheckpointIO`, a Lightning CheckpointIO plugin that writes Lightning's
  checkpoints as pyengine checkpoints (asynchronous, atomic, checksummed, never pickled).
- `accelerate`: `AcceleratorCheckpointer`, an Accelerate loop's full state (models, optimizers,
  schedulers, registered objects such as a pe.data.Loader, RNG) in a pe.Checkpointer, and its
  `export_pretrained` (`pretrained_export`), a directory transformers' from_pretrained loads.
"""
