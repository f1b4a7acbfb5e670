"""Measurement code behind `pyengine bench`, shipped with the package so that an installed
pyengine can run its own studies; the scripts in the repository's bench/ are thin wrappers.

    frequency   the checkpoint-frequency trade-off study (overhead and expected waste against
                the interval, for torch.save, DCP and pyengine; Young/Daly and
                OverheadBudget marked)
    dcp_baselines
                torch.distributed.checkpoint as documented and as its best users configure it
                (a reused DefaultStager, asynchronous staging, THREAD and PROCESS checkpointers)
    suite       runs every part of the suite and writes tables, JSON/CSV and PNG plots

Nothing here is imported by `import pyengine`; matplotlib is optional (plots are skipped
without it).
"""
