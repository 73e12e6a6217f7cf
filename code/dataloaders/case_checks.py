"""Checks of the pre-processed case files and split lists, run once before any long training or test run.

A corrupt file 50 cases into a split, or a case listed both for training and for validation, should fail the run
at its start with one line naming the files, not at iteration 5,000 or as a silently optimistic validation score.

    splits = {s: read_split_file(root / f"{s}.txt") for s in ("train", "val")}
    check_split_cases(root, splits, labelled=set(splits["train"][:labeled_num]) | set(splits["val"]))

The layout is that of :mod:`dataloaders.brats2019`: ``<root>/<split>.txt`` lists case names, one per line, and
``<root>/data/<case>.h5`` holds the datasets ``image`` ((D, H, W) or (C, D, H, W)) and ``label`` ((D, H, W) or
(K, D, H, W)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Union

import h5py

__all__ = ["CaseFileError", "SplitCheckError", "check_case_file", "check_split_cases", "image_channels"]

PathLike = Union[str, "os.PathLike[str]"]

_SHOWN = 3  # how many problems an error message spells out before "... and N more"


class CaseFileError(ValueError):
    """A case file that cannot be read as ``image`` (+ ``label``) HDF5; the message names the file."""


class SplitCheckError(ValueError):
    """Split lists that overlap, or listed case files that are missing or bad; one line naming them.

    Attributes:
        problems: one line per overlapping case or bad file, in list order.
    """

    def __init__(self, message: str, problems: Sequence[str]) -> None:
        super().__init__(message)
        self.problems = list(problems)


def check_case_file(path: PathLike, require_label: bool = True) -> None:
    """Check, without reading the arrays, that ``path`` is an HDF5 case file with an ``image`` (and ``label``).

    ``image`` must be a 3-D or 4-D dataset; a ``label`` dataset, required when ``require_label``, must share its
    last three (spatial) axes.

    Args:
        path: the ``.h5`` file.
        require_label: whether a missing ``label`` dataset is an error (default True).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CaseFileError: if it is not readable HDF5, lacks a dataset, or the shapes do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"case file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            image, label = f.get("image"), f.get("label")
            has_label = isinstance(label, h5py.Dataset)
            if not isinstance(image, h5py.Dataset) or (require_label and not has_label):
                wanted = "datasets 'image' and 'label'" if require_label else "a dataset 'image'"
                raise CaseFileError(f"{path} must hold {wanted}, found {sorted(f.keys())}")
            if image.ndim not in (3, 4):
                raise CaseFileError(f"{path}: image must be (D, H, W) or (C, D, H, W), found shape {image.shape}")
            if has_label and (label.ndim not in (3, 4) or image.shape[-3:] != label.shape[-3:]):
                raise CaseFileError(
                    f"{path}: image {image.shape} and label {label.shape} must share a 3-D spatial shape"
                )
    except CaseFileError:
        raise
    except Exception as err:  # h5py raises OSError for non-HDF5 / truncated files, sometimes others
        raise CaseFileError(
            f"{path} is not a readable HDF5 case file ({type(err).__name__}: {_one_line(err)})"
        ) from None


def check_split_cases(
    root: PathLike,
    splits: Mapping[str, Sequence[str]],
    labelled: set[str] | None = None,
    case_path: Callable[[str], Path] | None = None,
) -> None:
    """Refuse overlapping split lists, then check every listed case file once.

    1. No case may be listed twice: not in two lists (``train`` and ``val``, say), not twice in one list. All such
       cases are reported together, each with the lists it is in.
    2. Every listed ``<root>/data/<case>.h5`` must pass :func:`check_case_file`: it exists, opens as HDF5 and
       holds ``image`` and, for a labelled case, ``label``, with matching spatial shapes. All files are checked
       before the error is raised, so one run names every bad file.

    Args:
        root: dataset folder holding ``data/``.
        splits: list name (e.g. ``"train"``, the file being ``<name>.txt``) -> case names, as read with
            ``dataloaders.brats2019.read_split_file``.
        labelled: the cases that must have a ``label``; None (default) means every listed case.
        case_path: the file of a case name (``dataloaders.datasets.DatasetLayout.case_path``); default
            ``<root>/data/<case>.h5``.

    Raises:
        SplitCheckError: for overlapping lists (``"2 case(s) are listed more than once under <root>: 'A' in
            train.txt and val.txt; ..."``) or bad files (``"3 of 40 listed case file(s) under <root> are missing
            or bad: <first few>; ... and 1 more"``); ``problems`` holds every line.
        ValueError: if ``labelled`` names a case that no list holds.
    """
    root = Path(root)
    lists_of: dict[str, list[str]] = {}
    for split, names in splits.items():
        for name in names:
            lists_of.setdefault(name, []).append(f"{split}.txt")
    overlaps = []
    for name, lists in lists_of.items():
        if len(lists) > 1:
            where = f"twice in {lists[0]}" if len(set(lists)) == 1 else "in " + " and ".join(dict.fromkeys(lists))
            overlaps.append(f"{name!r} {where}")
    if overlaps:
        raise SplitCheckError(
            f"{len(overlaps)} case(s) are listed more than once under {root}: {_first_few(overlaps)}; "
            "a case belongs to one list only",
            overlaps,
        )
    if labelled is not None:
        unknown = sorted(set(labelled) - set(lists_of))
        if unknown:
            raise ValueError(f"labelled names {len(unknown)} case(s) that no split list holds: {_first_few(unknown)}")
    bad = []
    for name in lists_of:
        path = case_path(name) if case_path is not None else root / "data" / f"{name}.h5"
        try:
            check_case_file(path, require_label=labelled is None or name in labelled)
        except (FileNotFoundError, CaseFileError) as err:
            bad.append(str(err))
    if bad:
        raise SplitCheckError(
            f"{len(bad)} of {len(lists_of)} listed case file(s) under {root} are missing or bad: {_first_few(bad)}",
            bad,
        )


def image_channels(path: PathLike) -> int:
    """The channels of a case file's ``image``: C of a (C, D, H, W) image, 1 of a (D, H, W) one."""
    with h5py.File(path, "r") as f:
        shape = f["image"].shape
    return int(shape[0]) if len(shape) == 4 else 1


def _first_few(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
