"""Where the engine's findings go: any Lightning logger, the console, a JSON file, TensorBoard extras."""

from lightning_gradguard.output.sinks.console import print_summary
from lightning_gradguard.output.sinks.json_file import write_report
from lightning_gradguard.output.sinks.loggers import log_to_loggers

__all__ = ["log_to_loggers", "print_summary", "write_report"]
