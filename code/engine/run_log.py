"""The run's log file, its parser, the TensorBoard image grid and the progress bar."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from methods.base import Batch

__all__ = ["image_grid", "logged_losses", "logger", "progress_bar", "setup_logging"]

logger = logging.getLogger("ugmcl")


def setup_logging(out: Path | None) -> None:
    """Log to ``out/log.txt``; with ``out=None`` (ranks other than 0) log nothing."""
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if out is None:
        logger.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
    file_handler = logging.FileHandler(out / "log.txt")
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)


_LOGGED_LOSS = re.compile(r"\] iteration \d+ : loss :? ?([^,\s]+)")  # ours, or the released "loss : X"


def logged_losses(log_text: str) -> list[float]:
    """The per-iteration losses of a run's ``log.txt`` (its ``iteration N : loss ...`` lines), in order.

    Also reads the released code's logs, whose lines say ``iteration N : loss : X, ...``.
    """
    return [float(m.group(1)) for m in map(_LOGGED_LOSS.search, log_text.splitlines()) if m]


def image_grid(batch: Batch, probs: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
    """A (1, H, W*k) grid of the middle slice of sample 0: input | prediction | label | extra volumes."""
    image = batch.image[0, 0].detach().float().cpu()
    z = image.shape[-1] // 2

    def norm(a: torch.Tensor) -> torch.Tensor:
        a = a.float()
        lo, hi = a.min(), a.max()
        return (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)

    tiles = [norm(image[..., z]), probs[0].argmax(0).float().cpu()[..., z], batch.label[0].float().cpu()[..., z]]
    tiles += [norm(v.detach().float().cpu()[..., z]) for v in extra.values()]
    return torch.cat(tiles, dim=1).unsqueeze(0)




def progress_bar(steps: range, enabled: bool, total: int, desc: str) -> Any:
    """A tqdm bar over ``steps`` on stderr, or ``steps`` itself when not ``enabled``."""
    if not enabled:
        return steps
    from tqdm import tqdm

    return tqdm(steps, total=total, initial=steps.start, ncols=90, desc=desc, file=sys.stderr,
                mininterval=1.0)
