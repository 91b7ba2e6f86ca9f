"""The log filter of the command-line tools (``dsc-train``, ``dsc-sample``)."""

from __future__ import annotations

import logging as std_logging

from absl import flags


class QuietLibraries(std_logging.Filter):
    """Unless ``--verbosity >= 1``: drop INFO records of libraries (orbax, jax, ...), and their
    error records that carry a traceback (orbax logs each failed background save three times
    with its traceback; dsc_jax reports the failure as one line). Keep everything from dsc_jax
    and every other warning and error."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "dsc_jax" in record.pathname or flags.FLAGS.verbosity >= 1:
            return True
        if record.levelno >= std_logging.ERROR and record.exc_info:
            return False
        return record.levelno >= std_logging.WARNING
