"""Prepare any 3-D dataset in the nnU-Net v2 or Medical Segmentation Decathlon raw layout for training.

    cd code && python prepare_dataset.py --raw_dir ../data/raw/Task05_Prostate --out_dir ../data/Prostate

writes, for ``--dataset folder`` training (``dataloaders/datasets.py``):

- ``<out_dir>/data/<case>.h5``: ``image`` float32, (D, H, W) for one channel or (C, D, H, W) for several
  (``dataset.json`` channel order), z-scored per channel over its nonzero voxels (``--normalisation zscore``,
  default), with nnU-Net's CT scheme (``ct``: clip to the 0.5 / 99.5 percentiles of the labelled voxels of the
  whole training set, z-score with their mean and std) or left as they are (``none``); ``label`` uint8 (D, H, W),
  values ``0 .. K-1`` in the order of ``dataset.json``'s ``labels``, only for labelled cases; gzip; geometry and
  provenance attributes (``affine``, ``spacing``, ``original_shape``, ``original_affine``, ``bbox_start``,
  ``bbox_stop_exclusive``, ``channel_names`` and ``labels`` as JSON ...);
- ``train.txt`` / ``val.txt`` / ``test.txt``: a seeded split of the labelled cases in the BraTS2019 proportions
  250 / 25 / 60 (``dataloaders.preprocess.make_splits``, with its ``split_manifest.json``: a rerun keeps the split
  while the labelled cases are the same, lists you wrote yourself are never changed);
- ``unlabeled.txt``: the unlabelled cases (images in ``imagesTr`` without a label file, and every case of an
  optional ``imagesUnlabelled/`` folder named as ``imagesTr``), empty when there are none;
- ``dataset.json``: ``name``, ``source_layout`` (``nnunet`` / ``msd``), ``channel_names``, ``labels``
  (``{name: class index}``), ``num_classes``, ``in_channels``, ``cases``, ``unlabeled``, and the options used.

``imagesTs/`` (test images without labels) is not read. A bad case (missing channel file, wrong channel count,
shapes that differ, a label value not in ``dataset.json``, an unreadable file) is reported in one line naming the
file and left out; the run then ends with exit code 1. A bad ``dataset.json`` stops the run at once (exit 1).
Files only ever appear complete (temporary name, then rename); temporary files a killed run left are removed at
the next start. The steps themselves live in ``dataloaders/raw_datasets.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataloaders.preprocess import CaseError, OutputError, make_splits
from dataloaders.raw_datasets import (
    NORMALISATIONS,
    CaseOutcome,
    PrepareOptions,
    RawCase,
    RawDataset,
    RawDatasetError,
    ct_foreground_samples,
    ct_intensity_properties,
    ct_samples_per_case,
    read_raw_dataset,
    run_in_workers,
    try_prepare_case,
)
from utils.atomic import atomic_write_text, remove_stale_parts
from utils.cli import run_writing_into

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "nnU-Net v2 raw folder or MSD task folder -> <out_dir>/data/<case>.h5, train/val/test.txt, "
            "unlabeled.txt, dataset.json. imagesTs/ (test images without labels) is not read; images without a "
            "label, and those of imagesUnlabelled/, are written as unlabelled cases."
        ),
    )
    parser.add_argument("--raw_dir", type=Path, required=True, help="the raw dataset folder (holds dataset.json)")
    parser.add_argument(
        "--out_dir", type=Path, required=True, help="output root: data/<case>.h5, split lists, dataset.json"
    )
    parser.add_argument(
        "--spacing", type=float, default=None,
        help="resample to this isotropic voxel size in mm (linear for images, nearest for labels; default: keep "
        "the voxels)",
    )
    parser.add_argument(
        "--normalisation", choices=NORMALISATIONS, default="zscore",
        help="zscore: per case and channel over the nonzero voxels (default); ct: nnU-Net's CT scheme over the "
        "labelled voxels of the training set; none: keep the intensities",
    )
    parser.add_argument(
        "--crop", action="store_true", help="crop each case to the box of its nonzero (and labelled) voxels"
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed of the split of the labelled cases (default 1337)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preparation; returns the exit code.

    0: all good; 1: bad input (dataset.json or a case) or an output that cannot be written; 2: bad arguments;
    130: interrupted (Ctrl-C).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        options = PrepareOptions(spacing=args.spacing, normalisation=args.normalisation, crop=args.crop)
    except ValueError as err:
        parser.error(str(err))
    try:
        dataset = read_raw_dataset(args.raw_dir)
    except RawDatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)
    if options.normalisation == "zscore" and any(c.upper() == "CT" for c in dataset.channel_names):
        print("note: a channel is named CT; --normalisation ct uses nnU-Net's CT scheme", file=sys.stderr)

    data_dir = args.out_dir / "data"
    run = functools.partial(_prepare, args, dataset, options, data_dir)
    return run_writing_into(args.out_dir, (args.out_dir, data_dir), run, one_line_errors=(OutputError,))


def _prepare(args: argparse.Namespace, dataset: RawDataset, options: PrepareOptions, data_dir: Path) -> int:
    stale = remove_stale_parts(data_dir) + remove_stale_parts(args.out_dir)
    if stale:
        print(f"removed {len(stale)} unfinished temporary file(s) of an interrupted run", file=sys.stderr)
    failed: dict[str, str] = {}
    ct_properties = None
    if options.normalisation == "ct":
        ct_properties = _ct_properties(dataset, args.seed, args.workers, failed)
        if ct_properties is None:
            return 1
    todo = [c for c in dataset.cases if c.name not in failed]
    calls = [(case, dataset, options, data_dir, ct_properties) for case in todo]
    outcomes: list[CaseOutcome] = []
    runner = run_in_workers(try_prepare_case, calls, args.workers)
    with contextlib.closing(runner), tqdm(total=len(calls), desc="prepare", unit="case", disable=None) as bar:
        for outcome in runner:
            outcomes.append(outcome)
            bar.update(1)
            if outcome.status == "failed":
                failed[outcome.name] = outcome.message
                tqdm.write(f"error: {outcome.message}", file=sys.stderr)

    labelled = sorted(o.name for o in outcomes if o.status == "written" and o.labelled)
    unlabelled = sorted(o.name for o in outcomes if o.status == "written" and not o.labelled)
    print(
        f"{len(dataset.cases)} cases found ({dataset.layout} layout): {len(labelled)} labelled and "
        f"{len(unlabelled)} unlabelled written, {len(failed)} failed; outputs in {data_dir}"
    )
    if failed:
        print(f"{len(failed)} case(s) failed and are left out: {', '.join(sorted(failed))}", file=sys.stderr)
    if not labelled:
        print(f"error: no labelled case could be prepared from {dataset.root}; nothing to split", file=sys.stderr)
        return 1
    try:
        splits = make_splits(labelled, args.seed, args.out_dir, log=lambda n: print(f"note: {n}", file=sys.stderr))
    except (ValueError, OSError) as err:
        print(f"error: split lists: {err}", file=sys.stderr)
        return 1
    atomic_write_text(args.out_dir / "unlabeled.txt", "".join(f"{name}\n" for name in unlabelled))
    summary = {
        "name": dataset.name,
        "source_layout": dataset.layout,
        "source_dir": str(dataset.root),
        "channel_names": list(dataset.channel_names),
        "labels": dataset.label_indices,
        "source_label_values": {name: value for name, value in dataset.labels},
        "num_classes": dataset.num_classes,
        "in_channels": len(dataset.channel_names),
        "cases": len(labelled),
        "unlabeled": len(unlabelled),
        "normalisation": options.normalisation,
        "ct_properties": ct_properties,
        "spacing": options.spacing,
        "crop": options.crop,
        "seed": args.seed,
    }
    atomic_write_text(args.out_dir / "dataset.json", json.dumps(summary, indent=1) + "\n")
    sizes = ", ".join(f"{name} {len(names)}" for name, names in splits.items())
    print(f"split lists in {args.out_dir}: {sizes}, unlabeled {len(unlabelled)}")
    return 1 if failed else 0


def _ct_properties(
    dataset: RawDataset, seed: int, workers: int, failed: dict[str, str]
) -> list[dict[str, float]] | None:
    """Per channel, the CT statistics over the labelled voxels of every labelled case (bad cases go to ``failed``)."""
    cases = [c for c in dataset.cases if c.labelled]
    per_case = ct_samples_per_case(len(cases))
    calls = [(case, dataset, seed + i, per_case) for i, case in enumerate(cases)]
    samples: list[list[np.ndarray]] = [[] for _ in dataset.channel_names]
    for name, result in run_in_workers(_ct_samples_or_error, calls, workers):
        if isinstance(result, str):
            failed[name] = result
            print(f"error: {result}", file=sys.stderr)
            continue
        for c, values in enumerate(result):
            samples[c].append(values)
    try:
        return [ct_intensity_properties(s) for s in samples]
    except ValueError as err:
        print(f"error: --normalisation ct: {dataset.root}: {err}", file=sys.stderr)
        return None


def _ct_samples_or_error(
    case: RawCase, dataset: RawDataset, seed: int, per_case: int
) -> tuple[str, list[np.ndarray] | str]:
    """The case's CT samples, or its one-line error (module level: picklable for the worker processes)."""
    try:
        return case.name, ct_foreground_samples(case, dataset, seed, per_case)
    except CaseError as err:
        return case.name, str(err)
    except Exception as err:  # still one line naming the case
        return case.name, str(CaseError(case.name, f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    sys.exit(main())
