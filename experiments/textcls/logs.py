"""Logging setup for the command-line entry points."""

from __future__ import annotations

import logging as std_logging

from absl import logging


def quiet_orbax(min_level: int = std_logging.WARNING) -> None:
    """Drops orbax-checkpoint records below ``min_level`` (it logs a dozen INFO lines
    per checkpoint) from the absl log, keeping everything else."""

    def keep(record: std_logging.LogRecord) -> bool:
        return record.levelno >= min_level or "orbax" not in record.pathname

    logging.get_absl_handler().addFilter(keep)
