"""Where a run's output goes: a quiet console, and everything else in per-rank files under <out>/logs.

Every rank of a job imports the same libraries and so prints the same warnings, load reports and
progress bars; on the console eleven copies of them buried the twenty lines that matter. So each
process keeps its terminal for our own lines and points its file descriptors 1 and 2 (everything a
library prints, Python warnings, FedML's logging, a crash's traceback) at logs/rank<R>.out:
- rank 0's console shows the start line, one progress line per round with ETA, and the final
  table (`console=True` log records and `console_print`);
- every rank's own warnings and errors reach the console's stderr with the rank that had them;
- log_level DEBUG also shows every other line of ours on rank 0's console.
logs/rank<R>.log holds every log record of that rank.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, TextIO

log = logging.getLogger("fedml_fibec")

_console_out: TextIO = sys.stdout
_console_err: TextIO = sys.stderr


def console_print(text: str) -> None:
    """A line for the person watching (rank 0's final table and folder)."""
    print(text, file=_console_out, flush=True)


def console_error(text: str) -> None:
    """An error line on the console's stderr, whatever this process has redirected."""
    print(text, file=_console_err, flush=True)


class _ConsoleLines(logging.Filter):
    """Rank 0's console: lines marked console=True, or every line of ours below WARNING at DEBUG."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING and (self.verbose or getattr(record, "console", False))


def _redirect_output(target: Path) -> tuple[TextIO, TextIO]:
    """Point fds 1 and 2 at `target`; return writable handles on the original terminal streams."""
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    err = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return out, err


def setup_logging(out_dir: Path, rank: int, level: str, quiet: Optional[bool] = None) -> None:
    """Per-rank files and a quiet console (quiet=None: unless log_level is DEBUG)."""
    global _console_out, _console_err
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    verbose = level == "DEBUG"
    quiet = not verbose if quiet is None else quiet
    if quiet:
        _console_out, _console_err = _redirect_output(logs / f"rank{rank}.out")
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    file_handler = logging.FileHandler(logs / f"rank{rank}.log")
    file_handler.setFormatter(fmt)
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # library warnings become log records: into the file, not the console
    for h in list(log.handlers):
        log.removeHandler(h)
    problems = logging.StreamHandler(_console_err)
    problems.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s: %(message)s", "%H:%M:%S"))
    problems.setLevel(logging.WARNING)
    log.addHandler(problems)
    if rank == 0:
        ours = logging.StreamHandler(_console_out)
        ours.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
        ours.addFilter(_ConsoleLines(verbose))
        log.addHandler(ours)
    log.setLevel(getattr(logging, level))
