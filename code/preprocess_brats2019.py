"""Preprocess a raw BraTS release into the h5 layout the training and test scripts read (SPEC section 1).

    cd code && python preprocess_brats2019.py --raw_dir ../data/MICCAI_BraTS_2019_Data_Training \\
        --out_dir ../data/BraTS2019 --workers 4

writes ``<out_dir>/data/<case>.h5`` for every case found below ``--raw_dir`` and the split lists
``<out_dir>/{train,val,test}.txt`` (a seeded 250/25/60-proportioned split, or the lists already there, checked).
A split this script made (recorded in ``<out_dir>/split_manifest.json``) is remade when the set of good cases
changes, with a note on stderr; lists you supplied are never changed. A rerun skips cases whose valid output
exists with the same options (``--overwrite`` redoes them). A bad case is reported in one line and skipped, the
failures are listed at the end and the exit code is 1; ``--strict`` stops at the first one. An output that cannot
be written (a full disk, a read-only folder) stops the run with one line naming it, exit code 1.

Files only ever appear complete (written to a temporary name, then renamed); the temporary files a killed run
left behind are removed at the next start. Worker processes (``--workers``) end with this process, even when it
is killed. Two runs into the same ``--out_dir`` at once are refused. The pipeline itself lives in
``dataloaders/preprocess.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from dataloaders.preprocess import (
    LABEL_MODES,
    MODALITIES,
    CaseFiles,
    CaseResult,
    OutputError,
    PreprocessOptions,
    find_cases,
    make_splits,
    try_process_case,
)
from utils.atomic import remove_stale_parts
from utils.cli import run_writing_into
from utils.process import exit_with_parent

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded against each other
    fcntl = None  # type: ignore[assignment]

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Raw BraTS (<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz) -> <out_dir>/data/<case>.h5 + split lists",
    )
    parser.add_argument("--raw_dir", type=Path, required=True, help="folder holding the case folders, at any depth")
    parser.add_argument(
        "--out_dir", type=Path, required=True, help="output root: data/<case>.h5 and {train,val,test}.txt"
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITIES,
        default=["flair"],
        help="image channels, in this order (default: flair, as published)",
    )
    parser.add_argument(
        "--label_mode",
        choices=LABEL_MODES,
        default="wt",
        help="wt: seg > 0 -> 1 (default); regions: 3 channels WT/TC/ET; multiclass: 0/1/2/3 (4 -> 3)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="resample to this isotropic voxel size in mm (default: keep the 1 mm grid)",
    )
    parser.add_argument(
        "--axis_order",
        choices=("xyz", "zyx"),
        default="xyz",
        help="array axis order: xyz (nibabel, default) or zyx (SimpleITK, as the released script read)",
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed of the generated split (default 1337)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad case")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preprocessing; returns the exit code.

    0: all good; 1: a case or the split failed, or an output could not be written; 2: bad arguments;
    130: interrupted (Ctrl-C).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        options = PreprocessOptions(
            modalities=tuple(args.modalities),
            label_mode=args.label_mode,
            spacing=args.spacing,
            axis_order=args.axis_order,
        )
        cases = find_cases(args.raw_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: no case folders (<case>/<case>_flair.nii.gz ...) found below {args.raw_dir}", file=sys.stderr)
        return 2

    data_dir = args.out_dir / "data"

    def run() -> int:
        with _only_run_in(data_dir):
            return _preprocess(args, cases, options, data_dir)

    return run_writing_into(
        args.out_dir, (args.out_dir, data_dir), run, one_line_errors=(OutputError,), rerun_to="continue"
    )


def _preprocess(
    args: argparse.Namespace, cases: Sequence[CaseFiles], options: PreprocessOptions, data_dir: Path
) -> int:
    """Clean up after an interrupted run, process every case, write the split; returns the exit code."""
    stale = remove_stale_parts(data_dir) + remove_stale_parts(args.out_dir)
    if stale:
        shown = ", ".join(p.name for p in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        print(f"removed {len(stale)} unfinished temporary file(s) of an interrupted run: {shown}", file=sys.stderr)
    results: list[CaseResult] = []
    runner = _run_all(cases, data_dir, options, args.overwrite, args.workers)
    try:
        with contextlib.closing(runner), tqdm(total=len(cases), desc="preprocess", unit="case") as bar:
            for result in runner:
                results.append(result)
                bar.update(1)
                if result.status == "failed":
                    tqdm.write(f"FAILED {result.message}", file=sys.stderr)
                    if args.strict:
                        break  # closing the runner cancels the cases not started yet
    except OutputError as err:
        kept = sum(r.status != "failed" for r in results)
        print(
            f"error: {err}; the {kept} finished case(s) are kept and a rerun continues from there",
            file=sys.stderr,
        )
        return 1

    failed = [r for r in results if r.status == "failed"]
    done = sorted(r.name for r in results if r.status != "failed")
    counts = {status: sum(r.status == status for r in results) for status in ("written", "skipped")}
    print(
        f"{len(cases)} cases found: {counts['written']} written, {counts['skipped']} skipped (already done), "
        f"{len(failed)} failed; outputs in {data_dir}"
    )
    if args.strict and failed:
        print(f"stopped at the first bad case (--strict): {failed[0].message}", file=sys.stderr)
        return 1
    if failed:
        print(f"{len(failed)} case(s) failed and are left out:", file=sys.stderr)
        for result in sorted(failed):
            print(f"  {result.message}", file=sys.stderr)
    if done:
        try:
            splits = make_splits(
                done, args.seed, args.out_dir, log=lambda note: print(f"note: {note}", file=sys.stderr)
            )
        except (ValueError, OSError) as err:
            print(f"error: split lists: {err}", file=sys.stderr)
            return 1
        sizes = ", ".join(f"{name} {len(names)}" for name, names in splits.items())
        print(f"split lists in {args.out_dir}: {sizes}")
    return 1 if failed else 0


@contextlib.contextmanager
def _only_run_in(folder: Path) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` for the run; another run holding it gives an ``OutputError``.

    The stale-file cleanup at the start of a run is only safe when no other run writes into the folder.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another preprocess_brats2019.py run is writing into {folder}; wait for it to end or use another "
                "--out_dir"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _run_all(
    cases: Sequence[CaseFiles], data_dir: Path, options: PreprocessOptions, overwrite: bool, workers: int
) -> Iterator[CaseResult]:
    """Yield one result per case: in order when sequential, as they finish with a pool.

    Closing the generator early cancels the cases not started yet; running ones finish their (atomic) writes.
    """
    if workers == 1:
        for case in cases:
            yield try_process_case(case, data_dir, options, overwrite)
        return
    # spawn: the same behaviour on Linux, macOS and Windows, and no fork of a process that may hold threads.
    # exit_with_parent: the workers must not outlive this process when it is killed.
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(cases)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = [pool.submit(try_process_case, case, data_dir, options, overwrite) for case in cases]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


if __name__ == "__main__":
    sys.exit(main())
