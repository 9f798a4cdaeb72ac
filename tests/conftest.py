"""Shared fixtures: a quiet, fast, CPU-only Trainer factory.

The tests run real ``lightning.Trainer`` fits on tiny models. One intra-op thread keeps them fast and
deterministic on small CI machines, and Lightning's informational chatter (device banners, "Tip" adverts,
"few workers" hints) is silenced so that a failing test's output shows what matters.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import lightning.pytorch  # noqa: F401 - imported first: it sets its loggers' levels, which are lowered below
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `from models import ...` in every test file

from models import quiet_trainer_options  # noqa: E402 - needs the path above

torch.set_num_threads(1)

for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# Lightning hints that are irrelevant for tiny in-memory datasets
_QUIET = (
    r".*does not have many workers.*",
    r".*number of training batches.*smaller than the logging interval.*",
    r".*`training_step` returned `None`.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*module\(s\) in eval mode at the start of training.*",
    r".*callbacks used to create the checkpoint need to be provided.*",
)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@pytest.fixture(autouse=True)
def _no_internal_error(request):
    """GradGuard isolates its own failures so that training goes on; a test must never pass because of that.

    A test that breaks GradGuard on purpose is marked ``@pytest.mark.internal_error``.
    """
    from lightning_gradguard import isolation

    seen: list[str] = []
    isolation.listeners.append(seen.append)
    try:
        yield
    finally:
        isolation.listeners.remove(seen.append)
    if seen and request.node.get_closest_marker("internal_error") is None:
        pytest.fail(f"GradGuard reported an internal error: {seen[0]}")


@pytest.fixture
def make_trainer(tmp_path):
    """Build a quiet CPU Trainer: ``make_trainer(callbacks=[...], max_epochs=2, logger=TensorBoardLogger(...))``.

    Defaults: one epoch, no logger, no checkpointing, no progress bar or model summary, ``tmp_path`` as root.
    Any keyword overrides a default.
    """
    from lightning.pytorch import Trainer

    def factory(**kwargs) -> Trainer:
        options = quiet_trainer_options(tmp_path)
        options.update(kwargs)
        return Trainer(**options)

    return factory

