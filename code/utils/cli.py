"""What the preparation scripts share on the command line: the output folders and the one-line errors of a run."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from utils.atomic import NotWritableError, check_writable

__all__ = ["run_writing_into"]


def run_writing_into(
    out_dir: Path,
    folders: Sequence[Path],
    body: Callable[[], int],
    *,
    one_line_errors: tuple[type[OSError], ...] = (),
    rerun_to: str = "redo the run",
) -> int:
    """Check that ``folders`` can be written, create the last one, and return ``body()``, the run's exit code.

    A :class:`~utils.atomic.NotWritableError` or one of ``one_line_errors`` (one-line messages naming the output)
    is printed as ``error: <message>`` on stderr and gives 1; any other ``OSError`` (e.g. ``out_dir`` below a file)
    names ``--out_dir`` and gives 1; Ctrl-C says the finished cases are kept (``rerun the same command to
    <rerun_to>``) and gives 130.
    """
    try:
        for folder in folders:
            check_writable(folder, folder=True)
        folders[-1].mkdir(parents=True, exist_ok=True)
        return body()
    except (NotWritableError, *one_line_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. --out_dir below a file
        print(f"error: cannot use --out_dir {out_dir}: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: the finished cases are kept; rerun the same command to {rerun_to}", file=sys.stderr)
        return 130
