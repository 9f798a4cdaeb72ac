"""Write metrics through Lightning loggers (TensorBoard, CSV, W&B, MLflow, ...) with ``log_metrics``.

``LightningModule.log_dict`` is avoided on purpose: it builds one metric object per key every step
(lightning-internals.md, section 10: 20x slower for hundreds of keys). ``log_metrics`` takes plain floats
and is rank-zero only in every built-in logger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def log_to_loggers(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)
