"""A CPU-sized study on the 32 real BraTS2018 sample cases: a few methods, a few seeds, mean ± std.

    python scripts/mini_study.py --dry-run                 # print the commands, run nothing
    python scripts/mini_study.py                           # the whole study (hours on a laptop CPU)
    python scripts/mini_study.py --prepare_only            # split lists and preprocessing only

Steps, all inside ``--work_dir`` (default ``runs/mini_study`` of the repository, git-ignored):

1. Split lists ``preprocessed/{train,val,test}.txt``: the sorted case names of ``--raw_dir`` permuted with
   ``numpy.random.default_rng(--split_seed)``, cut into ``--n_train`` / ``--n_val`` / ``--n_test`` (24 / 2 / 6 of the
   32 samples); the labelled cases are the first ``--labeled_num`` (4) lines of ``train.txt``. They are written
   *before* preprocessing, so ``preprocess_brats2019.py`` uses them instead of making its own.
2. ``code/preprocess_brats2019.py``: FLAIR, whole tumour, resampled to ``--spacing`` mm (2: an 8x smaller volume),
   into ``preprocessed/data/<case>.h5``.
3. For every method and seed: the method's training script with a CPU-sized configuration (small patches, a
   narrower U-Net, fewer MC passes and iterations) and the method's published learning rate (UG-MCL 0.01 constant,
   the SSL4MIS baselines 0.1 poly), then ``code/test_3D_dt.py`` on ``test.txt``; run folders in ``model/``, named
   as in ``reproduce_brats2019.py`` (``<exp>_seed<seed>_<labelled>``).
4. ``results.md`` and ``results.json``: mean ± std over seeds per method, one row per seed, and the configuration
   (every option, git commit, torch version, CPU, wall times).

With few iterations the released consistency ramp (w(t) = 0.1 * rampup(t // 150, 200), i.e. over 30,000
iterations) would keep the unsupervised terms near zero for the whole run, so by default it is rescaled to end
at ``--max_iterations`` (``--consistency_interval 1 --consistency_rampup <max_iterations>``, the same curve);
``--no-scale_rampup`` keeps the released one.

Resumable: finished runs (``summary.json`` present) are skipped, finished trainings only tested, preprocessing
skips done cases. Each script runs as a subprocess in ``code/`` (a failing run does not stop the study; the exit
status is then 1). The sample cases stay where they are: only derived h5 files are written, into ``--work_dir``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import reproduce_brats2019 as reproduce  # noqa: E402 - also puts code/ on sys.path

from dataloaders.preprocess import find_cases  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402

__all__ = ["SPLIT_NAMES", "build_parser", "main", "read_split_lists", "seeded_split", "write_split_lists"]

REPO = reproduce.REPO
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
DEFAULT_RAW_DIR = REPO.parent / "shared" / "data" / "brats2018_samples"
DEFAULT_WORK_DIR = REPO / "runs" / "mini_study"


def seeded_split(case_names: Sequence[str], n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[str]]:
    """Permute the sorted ``case_names`` with ``numpy.random.default_rng(seed)`` and cut train / val / test.

    Cases beyond ``n_train + n_val + n_test`` are left out. The labelled subset of a run is the first
    ``labeled_num`` names of ``"train"``.

    Raises:
        ValueError: if a name repeats, ``n_train < 1``, a size is negative, or the sizes add up to more cases
            than there are.
    """
    names = sorted(case_names)
    if len(set(names)) != len(names):
        raise ValueError("case names repeat; every case folder must have its own name")
    if n_train < 1 or n_val < 0 or n_test < 0:
        raise ValueError(f"split sizes must be n_train >= 1, n_val >= 0, n_test >= 0, found {n_train}/{n_val}/{n_test}")
    if n_train + n_val + n_test > len(names):
        raise ValueError(
            f"split sizes {n_train} + {n_val} + {n_test} = {n_train + n_val + n_test} exceed the {len(names)} cases "
            "found"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val : n_train + n_val + n_test],
    }


def read_split_lists(out_dir: str | Path) -> dict[str, list[str]] | None:
    """The lists ``<out_dir>/{train,val,test}.txt`` (blank lines and CRLF ignored), or None when none exists.

    Raises:
        ValueError: if only some of the three exist.
    """
    out = Path(out_dir)
    files = {split: out / f"{split}.txt" for split in SPLIT_NAMES}
    present = [split for split, path in files.items() if path.is_file()]
    if not present:
        return None
    if len(present) != len(files):
        raise ValueError(f"{out} holds {', '.join(f'{s}.txt' for s in present)} but not all of train/val/test.txt")
    return {split: [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for split, path in files.items()}


def write_split_lists(
    case_names: Sequence[str], out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int
) -> dict[str, list[str]]:
    """Write :func:`seeded_split` to ``<out_dir>/{train,val,test}.txt`` (atomically), or check the lists there.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ValueError: as :func:`seeded_split`, or if ``out_dir`` already holds lists that differ from this split
            (another seed or other sizes: remove them or use another work folder).
    """
    splits = seeded_split(case_names, n_train, n_val, n_test, seed)
    existing = read_split_lists(out_dir)
    if existing is not None:
        if existing != splits:
            sizes = "/".join(str(len(existing[s])) for s in SPLIT_NAMES)
            raise ValueError(
                f"{out_dir} already holds split lists ({sizes} cases) that differ from the seeded split "
                f"(seed {seed}, {n_train}/{n_val}/{n_test}); remove them or use another --work_dir"
            )
        return existing
    for split in SPLIT_NAMES:
        atomic_write_text(Path(out_dir) / f"{split}.txt", "".join(f"{name}\n" for name in splits[split]))
    return splits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and split")
    g.add_argument("--raw_dir", type=Path, default=DEFAULT_RAW_DIR,
                   help="raw BraTS case folders (default: %(default)s)")
    g.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="all outputs: preprocessed/, model/, results.md (default: %(default)s)")
    g.add_argument("--spacing", type=float, default=2.0, help="isotropic resampling in mm (default: 2)")
    g.add_argument("--n_train", type=int, default=24, help="training cases (default: 24)")
    g.add_argument("--n_val", type=int, default=2, help="validation cases (default: 2)")
    g.add_argument("--n_test", type=int, default=6, help="test cases (default: 6)")
    g.add_argument("--labeled_num", type=int, default=4, help="labelled cases = first N of train.txt (default: 4)")
    g.add_argument("--split_seed", type=int, default=1337, help="seed of the split (default: 1337)")
    g.add_argument("--preprocess_workers", type=int, default=1, help="preprocessing processes (default: 1)")
    g = p.add_argument_group("runs")
    g.add_argument("--methods", nargs="+", choices=reproduce.TABLE4_METHODS,
                   default=["supervised", "uamt", "dtc", "ugmcl"], help="methods (default: supervised uamt dtc ugmcl)")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="training seeds (default: 1 2)")
    g.add_argument("--max_iterations", type=int, default=300, help="training iterations (default: 300)")
    g.add_argument("--patch_size", type=int, nargs=3, default=[32, 32, 32], metavar=("X", "Y", "Z"),
                   help="training patch and test window (default: 32 32 32)")
    g.add_argument("--stride_xy", type=int, default=None, help="sliding-window stride, axes 0-1 (default: patch / 2)")
    g.add_argument("--stride_z", type=int, default=None, help="sliding-window stride, axis 2 (default: patch / 2)")
    g.add_argument("--feature_scale", type=int, default=8, help="U-Net width divisor (default: 8; published 4)")
    g.add_argument("--mc_passes", type=int, default=4,
                   help="MC-dropout passes of UG-MCL/UA-MT (default: 4; published 8)")
    g.add_argument("--mc_chunk", type=int, default=0, help="teacher passes per forward, 0 = all (default: 0)")
    g.add_argument("--batch_size", type=int, default=4, help="patches per batch (default: 4)")
    g.add_argument("--labeled_bs", type=int, default=2, help="labelled patches per batch (default: 2)")
    g.add_argument("--val_interval", type=int, default=50,
                   help="validate and checkpoint every N iterations (default: 50)")
    g.add_argument("--dtc_model", default="vnet_dt", help="network of DTC (default: vnet_dt, its published one)")
    g.add_argument("--baseline_lr", type=float, default=0.1, help="lr of the baselines (default: 0.1; UG-MCL 0.01)")
    g.add_argument("--baseline_poly", action=argparse.BooleanOptionalAction, default=True,
                   help="poly decay for the baselines (default: on; UG-MCL constant)")
    g.add_argument("--scale_rampup", action=argparse.BooleanOptionalAction, default=True,
                   help="consistency ramp over --max_iterations instead of 30,000 iterations (default: on)")
    g.add_argument("--device", default="cpu", help="cpu, auto, cuda ... (default: cpu)")
    g.add_argument("--amp", action="store_true", help="mixed precision (default: off)")
    g.add_argument("--num_workers", type=int, default=1, help="data-loader workers per training (default: 1)")
    g.add_argument("--train_args", default="", help="extra options for every training, one shell-quoted string")
    g.add_argument("--test_args", default="", help="extra options for every test, one shell-quoted string")
    g = p.add_argument_group("control")
    g.add_argument("--resume", action="store_true", help="continue interrupted trainings (default: restart them)")
    g.add_argument("--prepare_only", action="store_true", help="write the split lists and preprocess, then stop")
    g.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands (runnable from code/) and exit")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.labeled_num <= args.n_train:
        parser.error(f"--labeled_num must be in 1..--n_train ({args.n_train}), got {args.labeled_num}")
    if args.labeled_bs > args.labeled_num:
        parser.error(f"--labeled_bs ({args.labeled_bs}) exceeds --labeled_num ({args.labeled_num})")
    if args.max_iterations < 1 or args.val_interval < 1:
        parser.error(
            f"--max_iterations and --val_interval must be >= 1, got {args.max_iterations}, {args.val_interval}"
        )
    if args.spacing <= 0:
        parser.error(f"--spacing must be > 0 mm, got {args.spacing}")


def _strides(args: argparse.Namespace) -> tuple[int, int]:
    """The sliding-window strides: as given, else half the patch (as the demo)."""
    return (args.stride_xy or max(1, min(args.patch_size[:2]) // 2), args.stride_z or max(1, args.patch_size[2] // 2))


def _settings(args: argparse.Namespace, root: Path, model_dir: Path) -> reproduce.RunSettings:
    patch = [str(p) for p in args.patch_size]
    stride_xy, stride_z = (str(s) for s in _strides(args))
    train = [
        "--patch_size", *patch, "--feature_scale", str(args.feature_scale),
        "--mc_passes", str(args.mc_passes), "--mc_chunk", str(args.mc_chunk),
        "--batch_size", str(args.batch_size), "--labeled_bs", str(args.labeled_bs),
        "--num_workers", str(args.num_workers),
        "--val_interval", str(args.val_interval), "--save_interval", str(args.val_interval),
        "--stride_xy", stride_xy, "--stride_z", stride_z,
    ]
    if args.scale_rampup:
        train += ["--consistency_interval", "1", "--consistency_rampup", str(args.max_iterations)]
    test = ["--patch_size", *patch, "--stride_xy", stride_xy, "--stride_z", stride_z,
            "--feature_scale", str(args.feature_scale)]
    return reproduce.RunSettings(
        root_path=root,
        model_dir=model_dir,
        max_iterations=args.max_iterations,
        device=args.device,
        amp=args.amp,
        baseline_lr=args.baseline_lr,
        baseline_poly=args.baseline_poly,
        resume=args.resume,
        train_args=(*train, *shlex.split(args.train_args)),
        test_args=(*test, *shlex.split(args.test_args)),
    )


def _preprocess_command(args: argparse.Namespace, raw_dir: Path, root: Path) -> list[str]:
    return ["preprocess_brats2019.py", "--raw_dir", str(raw_dir), "--out_dir", str(root),
            "--spacing", f"{args.spacing:g}", "--seed", str(args.split_seed),
            "--workers", str(args.preprocess_workers)]


def _volume_shapes(root: Path, names: Sequence[str]) -> str:
    """``min / median / max`` of the preprocessed volume sides, per axis."""
    import h5py

    shapes = []
    for name in names:
        with h5py.File(root / "data" / f"{name}.h5", "r") as f:
            shapes.append(f["image"].shape[-3:])
    if not shapes:
        return "none"
    axes = list(zip(*shapes))
    return ", ".join(
        f"axis {i}: {min(a)} / {statistics.median(a):g} / {max(a)}" for i, a in enumerate(axes)
    ) + f" ({len(shapes)} cases; min / median / max voxels)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the study; return 0, or 1 when the data could not be prepared or a run failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    raw_dir, work = Path(os.path.abspath(args.raw_dir)), Path(os.path.abspath(args.work_dir))
    root, model_dir = work / "preprocessed", work / "model"
    settings = _settings(args, root, model_dir)
    try:
        runs = reproduce.make_runs(args.methods, [args.labeled_num], args.seeds, models={"dtc": args.dtc_model})
    except ValueError as err:
        parser.error(str(err))
    preprocess_cmd = _preprocess_command(args, raw_dir, root)

    if args.dry_run:
        reproduce.print_plan(
            [] if args.prepare_only else runs,
            settings,
            extra_first=[
                f"# split lists {root}/{{train,val,test}}.txt: seed {args.split_seed}, "
                f"{args.n_train}/{args.n_val}/{args.n_test} cases, labelled = first {args.labeled_num} of train.txt",
                reproduce.format_command(preprocess_cmd),
            ],
        )
        return 0

    started = time.time()
    log = reproduce.log
    try:
        cases = find_cases(raw_dir)
        names = [case.name for case in cases]
        splits = write_split_lists(names, root, args.n_train, args.n_val, args.n_test, args.split_seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    labelled = ", ".join(splits["train"][: args.labeled_num])
    log(f"split lists in {root}: train {len(splits['train'])} (labelled {labelled}), "
        f"val {len(splits['val'])}, test {len(splits['test'])}")

    log(f"preprocessing {len(names)} cases of {raw_dir} at {args.spacing:g} mm ...")
    t0 = time.time()
    code = reproduce.run_command(preprocess_cmd, work / "logs" / "preprocess_console.log")
    preprocess_seconds = time.time() - t0
    listed = [name for split in SPLIT_NAMES for name in splits[split]]
    missing = [name for name in listed if not (root / "data" / f"{name}.h5").is_file()]
    if missing:
        print(f"error: preprocessing (exit {code}) left {len(missing)} listed case(s) without an h5, e.g. "
              f"{missing[0]}; see {work / 'logs' / 'preprocess_console.log'}", file=sys.stderr)
        return 1
    if code != 0:
        log(f"note: preprocessing exited with {code} (a case outside the split lists failed); going on")
    shapes = _volume_shapes(root, listed)
    log(f"preprocessing done in {preprocess_seconds:.0f} s; volume sides {shapes}")
    if args.prepare_only:
        return 0

    log(f"{len(runs)} runs: methods {' '.join(args.methods)}, seeds {' '.join(map(str, args.seeds))}, "
        f"{args.max_iterations} iterations, device {args.device}")
    failed = [run.name for i, run in enumerate(runs, 1) if not reproduce.execute_run(run, settings, i, len(runs))]
    results = reproduce.collect_results(runs, settings)
    run_seconds = sum(float(r.extra.get(k) or 0.0) for r in results for k in ("train_seconds", "test_seconds"))
    total = time.time() - started
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dry_run"}
    options["stride_xy"], options["stride_z"] = _strides(args)
    config: dict[str, Any] = {
        **options,
        "raw_dir (absolute)": str(raw_dir),
        "work_dir (absolute)": str(work),
        "labelled cases": splits["train"][: args.labeled_num],
        "unlabelled cases": splits["train"][args.labeled_num :],
        "val cases": splits["val"],
        "test cases": splits["test"],
        "preprocessed volume sides": shapes,
        "train options (all runs)": shlex.join(settings.train_args),
        "test options (all runs)": shlex.join(settings.test_args),
        **reproduce.environment_info(),
        "preprocessing wall time (this invocation)": f"{preprocess_seconds:.0f} s",
        "train + test wall time of the tested runs (summed, all invocations)": f"{run_seconds:.0f} s",
        "total wall time (this invocation)": f"{total:.0f} s",
    }
    title = (f"Mini-study: {len(listed)} BraTS cases of {raw_dir.name}, FLAIR, whole tumour, {args.spacing:g} mm, "
             f"{args.labeled_num} labelled")
    notes = [
        f"Split: {args.n_train} train ({args.labeled_num} labelled) / {args.n_val} val / {args.n_test} test, "
        f"seed {args.split_seed}. CPU-sized configuration ({args.max_iterations} iterations, patch "
        f"{'x'.join(map(str, args.patch_size))}, U-Net width / {args.feature_scale}): numbers are not comparable with "
        "the paper's 30,000-iteration BraTS2019 runs.",
    ]
    reproduce.write_report(work / "results.md", title, results, config, paper=None, missing=failed, notes=notes)
    log(f"results in {work / 'results.md'} and {work / 'results.json'} ({len(results)} of {len(runs)} runs tested, "
        f"{total:.0f} s)")
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
