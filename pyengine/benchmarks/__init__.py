"""Measurement code behind `pyengine bench`, shipped with the package so that an installed
pyengine can run its own studies; the scripts in the repository's bench/ are thin wrappers.

    frequency   the checkpoint-frequency trade-off study (overhead and expected waste against
                the interval, for torch.save, DCP async_save and pyengine; Young/Daly and
                OverheadBudget marked)
    suite       runs every part of the suite and writes tables, JSON/CSV and PNG plots

Nothing here is imported by `import pyengine`; matplotlib is optional (plots are skipped
without it).
"""
