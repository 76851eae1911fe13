"""Shared training infrastructure for the imitation, GRPO and RoaD trainers.

* ``roadloop.train.tracking``: experiment tracking (a thin MLflow wrapper, local SQLite store by default).
* ``roadloop.train.checkpointing``: atomic, resumable trainer checkpoints, non-finite guards.

Submodules are imported explicitly (MLflow alone takes about a second to import).
"""
