"""Where the Trainer callback writes: every logger in ``trainer.loggers``, the TensorBoard dashboard of a
``TensorBoardLogger``, ``gradguard.json`` in the run's log directory, and the console summary."""

from __future__ import annotations

from typing import Any, Optional

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.engine import GradGuardEngine
from lightning_gradguard.output.reporter import Reporter
from lightning_gradguard.output.sinks.console import ConsoleSink
from lightning_gradguard.output.sinks.json_file import JsonSink
from lightning_gradguard.output.sinks.loggers import LoggerSink
from lightning_gradguard.output.sinks.tensorboard import TensorBoardDashboard, tensorboard_writers

_DEFAULT_EVERY = 50  # Lightning's default log_every_n_steps


def trainer_reporter(trainer: Any, engine: GradGuardEngine, config: GuardConfig) -> tuple[Reporter, Optional[JsonSink]]:
    """The reporter of one fit with its sinks, and the JSON sink among them (None without a logger)."""
    every = config.log_every_n_steps or trainer.log_every_n_steps or _DEFAULT_EVERY
    optimizers = list(trainer.optimizers)
    reporter = Reporter(
        engine,
        every=every,
        logs=bool(trainer.loggers),
        name=config.name,
        writes=trainer.is_global_zero,
        label=lambda opt: f"optimizer_{optimizers.index(opt)}" if opt in optimizers else type(opt).__name__,
    )
    # Trainer.log_dir broadcasts from rank zero (a collective): every rank asks, at the same point
    log_dir = trainer.log_dir if trainer.loggers else None
    if trainer.loggers:
        reporter.add(LoggerSink(trainer.loggers))
    writers = tensorboard_writers(trainer.loggers) if trainer.is_global_zero else []
    if writers:
        reporter.add(TensorBoardDashboard(writers, config.histogram_every_n_steps, config.gradient_flow_every_n_steps,
                                          config.max_logged_series))
    json_sink = JsonSink(log_dir) if log_dir is not None else None
    if json_sink is not None:  # written before the console summary, which names it
        reporter.add(json_sink)
    if config.summary:
        reporter.add(ConsoleSink(lambda: json_sink.target if json_sink is not None else None))
    return reporter, json_sink


__all__ = ["trainer_reporter"]
