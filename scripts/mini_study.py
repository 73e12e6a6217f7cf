"""CPU protocols on the real sample cases: a few methods, a few seeds, mean ± std and a paired test.

    python scripts/mini_study.py --preset brats              # the BraTS protocol (32 cases of ../shared)
    python scripts/mini_study.py --preset la                 # the Left Atrium protocol (32 cases of ../shared)
    python scripts/mini_study.py --preset la --dry-run       # print the commands, run nothing
    python scripts/mini_study.py --preset brats --resume     # continue a study that was cut off
    python scripts/mini_study.py --preset brats --jobs 2     # two runs at a time, one thread each (2 cores)

A preset (:data:`PRESETS`) names a dataset, its raw folder and every option of the protocol; any option given on
the command line overrides the preset's value (``--seeds 1``, ``--methods supervised ugmcl`` ...). Steps, all
inside ``--work_dir`` (default ``runs/mini_study_<preset>`` of the repository, git-ignored):

1. Split lists in ``preprocessed/``: the sorted case names permuted with ``numpy.random.default_rng(--split_seed)``,
   cut into ``--n_train`` / ``--n_val`` / ``--n_test``; the labelled cases are the first ``--labeled_num`` lines
   of the train list, the rest of it is unlabelled. The test cases are never seen in training or model selection.
2. The cases at ``--spacing`` mm: BraTS through ``code/preprocess_brats2019.py`` (FLAIR, whole tumour, brain crop);
   LA by resampling the UA-MT ``mri_norm2.h5`` files (0.625 mm) into the same tree under ``preprocessed/``, each
   with a ``spacing`` attribute so HD95 / ASD are in mm.
3. For every method and seed: its training script with the protocol's options (one optimiser for every method,
   so a difference is the method's, not its learning rate), then ``code/test_3D_dt.py`` on the test list, of the
   best-validation and the last weights. Run folders in ``model/`` (``<exp>_seed<seed>_<labelled>``).
4. ``results.md`` / ``results.json``: mean ± std over seeds per method, one row per seed, a paired test of every
   method against supervised-only over the (seed, test case) pairs, and the configuration (every option, git
   commit, torch version, CPU, wall times).

The consistency ramp is rescaled to end at ``--max_iterations`` (``--consistency_interval 1
--consistency_rampup <max_iterations>``, the released sigmoid curve); ``--no-scale_rampup`` keeps the released
30,000-iteration one. BCP pre-trains for ``--bcp_pretrain_fraction`` of the iterations.

Resumable: finished runs (``summary.json`` present) are skipped, finished trainings only tested, prepared cases
kept. Each script runs as a subprocess in ``code/`` (a failing run does not stop the study; the exit status is
then 1). The sample cases stay where they are: only derived files are written, into ``--work_dir``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import reproduce_brats2019 as reproduce  # noqa: E402 - also puts code/ on sys.path
import summarise_results  # noqa: E402

from dataloaders.datasets import DATASETS  # noqa: E402
from dataloaders.preprocess import find_cases, is_valid_h5, read_h5_attrs, resample_case_file  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402

__all__ = [
    "FIXED_NETWORKS",
    "LA_SOURCE_MM",
    "PRESETS",
    "Preset",
    "SHARED_DATA",
    "SPLIT_NAMES",
    "build_parser",
    "find_h5_cases",
    "main",
    "parse_args",
    "prepare_resampled",
    "read_split_lists",
    "seeded_split",
    "write_split_lists",
]

REPO = reproduce.REPO
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
SHARED_DATA = REPO.parent / "shared" / "data"
LA_SOURCE_MM = 0.625  # voxel size of the UA-MT LA files
FIXED_NETWORKS = {"mcnet_plus": "mcnet3d_v2", "urpc": "unet_3D_ds"}  # methods that need their own network


@dataclass(frozen=True)
class Preset:
    """A named CPU protocol: the dataset, where its raw cases are, and the value of every study option.

    Attributes:
        name: the ``--preset`` name.
        dataset: ``--dataset`` of the trainings and tests (``brats2019``, ``la``).
        raw_dir: the raw cases (BraTS case folders; the UA-MT LA tree).
        title: what the study is, for the report's heading.
        options: study option -> value, the defaults of :func:`build_parser` under this preset.
    """

    name: str
    dataset: str
    raw_dir: Path
    title: str
    options: Mapping[str, Any] = field(default_factory=dict)


_COMMON: dict[str, Any] = {
    "n_train": 20, "n_val": 4, "n_test": 8, "labeled_num": 8, "split_seed": 1337,
    "methods": ["supervised", "ugmcl"], "seeds": [1, 2, 3], "model": "vnet_dt", "feature_scale": 8,
    "mc_passes": 4, "mc_chunk": 0, "batch_size": 4, "labeled_bs": 2, "base_lr": 0.05, "lr_schedule": "poly",
    "val_interval": 50,
}

PRESETS: dict[str, Preset] = {
    "brats": Preset(
        "brats", "brats2019", SHARED_DATA / "brats2018_samples",
        "BraTS FLAIR, whole tumour",
        {**_COMMON, "spacing": 3.0, "max_iterations": 500, "patch_size": [48, 48, 48]},
    ),
    "la": Preset(
        "la", "la", SHARED_DATA / "la2018_samples",
        "Left Atrium 2018 (UA-MT files), left atrium",
        {**_COMMON, "spacing": 1.875, "max_iterations": 1000, "patch_size": [48, 48, 32], "base_lr": 0.02,
         "val_interval": 100},
    ),
}
"""``--preset`` -> :class:`Preset`. Both: 20 training cases (8 labelled, 12 unlabelled), 4 validation, 8 test;
V-Net (``vnet_dt``) at half width (8 first-stage filters), batch 4 (2 labelled), T = 4 teacher passes, SGD with
poly decay, the same for every method. ``brats``: 3 mm (a 48^3 patch holds most of a brain), lr 0.05, 500
iterations. ``la``: 1.875 mm (3x the UA-MT voxel; a 48x48x32 patch holds most of the cropped volume), lr 0.02 (0.05
diverged there), 1000 iterations."""


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


def _list_files(out_dir: Path, dataset: str) -> dict[str, Path]:
    layout = DATASETS[dataset]
    return {split: layout.split_path(out_dir, split) for split in SPLIT_NAMES}


def read_split_lists(out_dir: str | Path, dataset: str = "brats2019") -> dict[str, list[str]] | None:
    """The train / val / test lists of ``dataset``'s layout in ``out_dir`` (``train.txt`` ...; LA: ``train.list``
    ...; blank lines and CRLF ignored), or None when none exists.

    Raises:
        ValueError: if only some of the three exist.
    """
    files = _list_files(Path(out_dir), dataset)
    present = [split for split, path in files.items() if path.is_file()]
    if not present:
        return None
    if len(present) != len(files):
        names = ", ".join(files[s].name for s in present)
        raise ValueError(f"{out_dir} holds {names} but not all of the train/val/test lists")
    return {split: [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for split, path in files.items()}


def write_split_lists(
    case_names: Sequence[str], out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int,
    dataset: str = "brats2019",
) -> dict[str, list[str]]:
    """Write :func:`seeded_split` as ``dataset``'s lists in ``out_dir`` (atomically), or check the lists there.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ValueError: as :func:`seeded_split`, or if ``out_dir`` already holds lists that differ from this split
            (another seed or other sizes: remove them or use another work folder).
    """
    splits = seeded_split(case_names, n_train, n_val, n_test, seed)
    existing = read_split_lists(out_dir, dataset)
    if existing is not None:
        if existing != splits:
            sizes = "/".join(str(len(existing[s])) for s in SPLIT_NAMES)
            raise ValueError(
                f"{out_dir} already holds split lists ({sizes} cases) that differ from the seeded split "
                f"(seed {seed}, {n_train}/{n_val}/{n_test}); remove them or use another --work_dir"
            )
        return existing
    for split, path in _list_files(Path(out_dir), dataset).items():
        atomic_write_text(path, "".join(f"{name}\n" for name in splits[split]))
    return splits


def find_h5_cases(raw_dir: str | Path, dataset: str) -> list[str]:
    """The sorted names of the cases of ``dataset``'s layout under ``raw_dir`` (e.g. the LA tree's folders that hold
    ``mri_norm2.h5``).

    Raises:
        FileNotFoundError: if ``raw_dir`` is not a folder or holds no such case.
    """
    if not Path(raw_dir).is_dir():
        raise FileNotFoundError(f"raw data folder {raw_dir} does not exist or is not a folder")
    layout = DATASETS[dataset]
    parts = Path(layout.case_pattern).parts
    level = next(i for i, part in enumerate(parts) if "{name}" in part)
    prefix, suffix = parts[level].split("{name}")
    parent = Path(raw_dir).joinpath(*parts[:level])
    entries = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    names = [e[len(prefix): len(e) - len(suffix)] for e in entries
             if e.startswith(prefix) and e.endswith(suffix) and len(e) > len(prefix) + len(suffix)]
    names = [n for n in names if layout.case_path(raw_dir, n).is_file()]
    if not names:
        raise FileNotFoundError(f"{raw_dir} holds no case file {layout.case_pattern} ({dataset} layout)")
    return names


def prepare_resampled(raw_dir: Path, root: Path, dataset: str, names: Sequence[str], source_mm: float,
                      spacing: float) -> int:
    """Resample the case files ``names`` of ``raw_dir`` from ``source_mm`` to ``spacing`` mm into the same layout
    under ``root``; a file already there at that spacing is kept. Returns how many were written."""
    layout, written = DATASETS[dataset], 0
    for name in names:
        dst = layout.case_path(root, name)
        if is_valid_h5(dst) and np.allclose(read_h5_attrs(dst).get("spacing", 0.0), spacing):
            continue
        resample_case_file(layout.case_path(raw_dir, name), dst, source_mm, spacing)
        written += 1
    return written


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default (the preset's value) in its help."""


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    """The study's options; with ``preset``, its values are the defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="brats",
                   help="the protocol whose values every option below defaults to")
    g = p.add_argument_group("data and split")
    g.add_argument("--raw_dir", type=Path, default=None, help="raw cases (BraTS case folders, or the UA-MT LA tree)")
    g.add_argument("--work_dir", type=Path, default=None,
                   help="all outputs: preprocessed/, model/, results.md")
    g.add_argument("--spacing", type=float, help="isotropic voxel size in mm of the prepared cases")
    g.add_argument("--n_train", type=int, help="training cases (labelled + unlabelled)")
    g.add_argument("--n_val", type=int, help="validation cases (best-checkpoint selection)")
    g.add_argument("--n_test", type=int, help="test cases")
    g.add_argument("--labeled_num", type=int, help="labelled cases = the first N of the train list")
    g.add_argument("--split_seed", type=int, help="seed of the split")
    g.add_argument("--preprocess_workers", type=int, default=1, help="BraTS preprocessing processes")
    g = p.add_argument_group("runs")
    g.add_argument("--methods", nargs="+", choices=reproduce.TABLE4_METHODS, help="methods")
    g.add_argument("--seeds", type=int, nargs="+", help="training seeds")
    g.add_argument("--model", help="network of every method but MC-Net+ and URPC, which need their own; "
                                   "'default' = each entry script's")
    g.add_argument("--max_iterations", type=int, help="training iterations")
    g.add_argument("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="training patch and test window")
    g.add_argument("--stride_xy", type=int, default=None, help="sliding-window stride, axes 0-1")
    g.add_argument("--stride_z", type=int, default=None, help="sliding-window stride, axis 2")
    g.add_argument("--feature_scale", type=int, help="network width divisor (4 = published; 8 = half width)")
    g.add_argument("--mc_passes", type=int, help="MC-dropout passes of UG-MCL / UA-MT (published 8)")
    g.add_argument("--mc_chunk", type=int, help="teacher passes per forward, 0 = all")
    g.add_argument("--batch_size", type=int, help="patches per batch")
    g.add_argument("--labeled_bs", type=int, help="labelled patches per batch")
    g.add_argument("--val_interval", type=int, help="validate and checkpoint every N iterations")
    g.add_argument("--base_lr", type=float, help="SGD learning rate of every method")
    g.add_argument("--lr_schedule", choices=("constant", "poly", "step"), help="learning-rate schedule of every method")
    g.add_argument("--scale_rampup", action=argparse.BooleanOptionalAction, default=True,
                   help="consistency ramp over --max_iterations instead of 30,000 iterations")
    g.add_argument("--bcp_pretrain_fraction", type=float, default=0.2,
                   help="BCP: share of the iterations spent in copy-paste pre-training")
    g.add_argument("--device", default="cpu", help="cpu, auto, cuda ...")
    g.add_argument("--amp", action="store_true", help="mixed precision")
    g.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with cores / jobs threads")
    g.add_argument("--num_workers", type=int, default=1, help="data-loader workers per training")
    g.add_argument("--train_args", default="", help="extra options for every training, one shell-quoted string")
    g.add_argument("--test_args", default="", help="extra options for every test, one shell-quoted string")
    g = p.add_argument_group("control")
    g.add_argument("--resume", action="store_true", help="continue interrupted trainings")
    g.add_argument("--prepare_only", action="store_true", help="write the split lists and prepare the cases, then stop")
    g.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands (runnable from code/) and exit")
    if preset is not None:
        p.set_defaults(preset=preset.name, raw_dir=preset.raw_dir, work_dir=REPO / "runs" / f"mini_study_{preset.name}",
                       **preset.options)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace, Preset]:
    """Read ``--preset`` first, then every option with that preset's values as defaults."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS), default="brats")
    preset = PRESETS[first.parse_known_args(argv)[0].preset]
    parser = build_parser(preset)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return parser, args, preset


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
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if not 0.0 <= args.bcp_pretrain_fraction < 1.0:
        parser.error(f"--bcp_pretrain_fraction must be in [0, 1), got {args.bcp_pretrain_fraction}")


def _strides(args: argparse.Namespace) -> tuple[int, int]:
    """The sliding-window strides: as given, else half the patch (as the demo)."""
    return (args.stride_xy or max(1, min(args.patch_size[:2]) // 2), args.stride_z or max(1, args.patch_size[2] // 2))


def _models(args: argparse.Namespace) -> dict[str, str]:
    """``--model`` for every method that can train it; MC-Net+ and URPC keep their own networks."""
    if args.model in (None, "default"):
        return {}
    return {m: FIXED_NETWORKS.get(m, args.model) for m in args.methods}


def _settings(args: argparse.Namespace, preset: Preset, root: Path, model_dir: Path) -> reproduce.RunSettings:
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
    method_args = {
        "ugmcl": ("--variant", "paper") if _models(args).get("ugmcl", "").startswith("vnet") else (),
        "bcp": ("--bcp_pretrain_iterations", str(int(args.bcp_pretrain_fraction * args.max_iterations))),
    }
    return reproduce.RunSettings(
        root_path=root,
        model_dir=model_dir,
        max_iterations=args.max_iterations,
        device=args.device,
        amp=args.amp,
        dataset=preset.dataset,
        resume=args.resume,
        train_args=(*train, *shlex.split(args.train_args)),
        test_args=(*test, *shlex.split(args.test_args)),
        method_train_args=method_args,
        optimiser=(args.base_lr, args.lr_schedule),
    )


def _prepare_command(args: argparse.Namespace, raw_dir: Path, root: Path) -> list[str]:
    return ["preprocess_brats2019.py", "--raw_dir", str(raw_dir), "--out_dir", str(root),
            "--spacing", f"{args.spacing:g}", "--seed", str(args.split_seed),
            "--workers", str(args.preprocess_workers)]


def _case_names(preset: Preset, raw_dir: Path) -> list[str]:
    if preset.dataset == "brats2019":
        return [case.name for case in find_cases(raw_dir)]
    return find_h5_cases(raw_dir, preset.dataset)


def _prepare_cases(args: argparse.Namespace, preset: Preset, raw_dir: Path, root: Path, work: Path,
                   listed: Sequence[str]) -> int:
    """Write the listed cases at ``--spacing`` into ``root``; return 0, or the preprocessing's exit status."""
    if preset.dataset == "brats2019":
        return reproduce.run_command(_prepare_command(args, raw_dir, root), work / "logs" / "preprocess_console.log")
    written = prepare_resampled(raw_dir, root, preset.dataset, listed, LA_SOURCE_MM, args.spacing)
    reproduce.log(f"resampled {written} case(s) from {LA_SOURCE_MM:g} to {args.spacing:g} mm "
                  f"({len(listed) - written} already there)")
    return 0


def _volume_shapes(root: Path, dataset: str, names: Sequence[str]) -> str:
    """``min / median / max`` of the prepared volume sides, per axis."""
    import h5py

    shapes = []
    for name in names:
        with h5py.File(DATASETS[dataset].case_path(root, name), "r") as f:
            shapes.append(f["image"].shape[-3:])
    if not shapes:
        return "none"
    axes = list(zip(*shapes))
    return ", ".join(
        f"axis {i}: {min(a)} / {statistics.median(a):g} / {max(a)}" for i, a in enumerate(axes)
    ) + f" ({len(shapes)} cases; min / median / max voxels)"


def _print_plan(args: argparse.Namespace, preset: Preset, runs: Sequence[reproduce.Run],
                settings: reproduce.RunSettings, raw_dir: Path, root: Path) -> None:
    prepare = (reproduce.format_command(_prepare_command(args, raw_dir, root)) if preset.dataset == "brats2019"
               else f"# resample {raw_dir} ({LA_SOURCE_MM:g} mm) to {args.spacing:g} mm into {root}")
    reproduce.print_plan(
        [] if args.prepare_only else runs,
        settings,
        extra_first=[
            f"# preset {preset.name}: split lists in {root}: seed {args.split_seed}, "
            f"{args.n_train}/{args.n_val}/{args.n_test} cases, labelled = first {args.labeled_num} of the train list",
            prepare,
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the study; return 0, or 1 when the data could not be prepared or a run failed."""
    parser, args, preset = parse_args(argv)
    raw_dir, work = Path(os.path.abspath(args.raw_dir)), Path(os.path.abspath(args.work_dir))
    root, model_dir = work / "preprocessed", work / "model"
    settings = _settings(args, preset, root, model_dir)
    try:
        runs = reproduce.make_runs(args.methods, [args.labeled_num], args.seeds, models=_models(args),
                                   dataset=preset.dataset)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        _print_plan(args, preset, runs, settings, raw_dir, root)
        return 0

    started = time.time()
    log = reproduce.log
    try:
        names = _case_names(preset, raw_dir)
        splits = write_split_lists(names, root, args.n_train, args.n_val, args.n_test, args.split_seed,
                                   preset.dataset)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    labelled = ", ".join(splits["train"][: args.labeled_num])
    log(f"preset {preset.name}: split lists in {root}: train {len(splits['train'])} (labelled {labelled}), "
        f"val {len(splits['val'])}, test {len(splits['test'])}")

    log(f"preparing {len(names)} cases of {raw_dir} at {args.spacing:g} mm ...")
    t0 = time.time()
    listed = [name for split in SPLIT_NAMES for name in splits[split]]
    try:
        code = _prepare_cases(args, preset, raw_dir, root, work, listed)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    prepare_seconds = time.time() - t0
    layout = DATASETS[preset.dataset]
    missing = [name for name in listed if not layout.case_path(root, name).is_file()]
    if missing:
        print(f"error: preparing the cases (exit {code}) left {len(missing)} listed case(s) without a file, e.g. "
              f"{missing[0]}; see {work / 'logs'}", file=sys.stderr)
        return 1
    if code != 0:
        log(f"note: preprocessing exited with {code} (a case outside the split lists failed); going on")
    shapes = _volume_shapes(root, preset.dataset, listed)
    log(f"cases ready in {prepare_seconds:.0f} s; volume sides {shapes}")
    if args.prepare_only:
        return 0

    log(f"{len(runs)} runs: methods {' '.join(args.methods)}, seeds {' '.join(map(str, args.seeds))}, "
        f"{args.max_iterations} iterations, device {args.device}")
    failed = _execute_runs(runs, settings, args.jobs)
    _write_results(args, preset, runs, settings, splits, shapes, raw_dir, work, started, prepare_seconds, failed)
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _execute_runs(runs: Sequence[reproduce.Run], settings: reproduce.RunSettings, jobs: int) -> list[str]:
    """Train and test every run, ``jobs`` at a time; return the names of those that failed.

    With several jobs and no ``OMP_NUM_THREADS`` set, each run gets ``cores // jobs`` threads (spinning OpenMP
    threads of concurrent runs on the same cores slow all of them many times).
    """
    def execute(item: tuple[int, reproduce.Run]) -> bool:
        return reproduce.execute_run(item[1], settings, item[0], len(runs))

    set_threads = jobs > 1 and "OMP_NUM_THREADS" not in os.environ
    if set_threads:  # read by the run processes only (this one's torch has started)
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(execute, enumerate(runs, 1)))
    finally:
        if set_threads:
            del os.environ["OMP_NUM_THREADS"]
    return [run.name for run, ok in zip(runs, done) if not ok]


def _write_results(args: argparse.Namespace, preset: Preset, runs: Sequence[reproduce.Run],
                   settings: reproduce.RunSettings, splits: Mapping[str, list[str]], shapes: str, raw_dir: Path,
                   work: Path, started: float, prepare_seconds: float, failed: Sequence[str]) -> None:
    results = reproduce.collect_results(runs, settings)
    run_seconds = sum(float(r.extra.get(k) or 0.0) for r in results for k in ("train_seconds", "test_seconds"))
    total = time.time() - started
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dry_run"}
    options["stride_xy"], options["stride_z"] = _strides(args)
    config: dict[str, Any] = {
        **options,
        "dataset": preset.dataset,
        "raw_dir (absolute)": str(raw_dir),
        "work_dir (absolute)": str(work),
        "labelled cases": splits["train"][: args.labeled_num],
        "unlabelled cases": splits["train"][args.labeled_num :],
        "val cases": splits["val"],
        "test cases": splits["test"],
        "prepared volume sides": shapes,
        "train options (all runs)": shlex.join(settings.train_args),
        **{f"train options ({m})": shlex.join(a) for m, a in settings.method_train_args.items() if m in args.methods},
        "test options (all runs)": shlex.join(settings.test_args),
        **reproduce.environment_info(),
        "preparation wall time (this invocation)": f"{prepare_seconds:.0f} s",
        "train + test wall time of the tested runs (summed, all invocations)": f"{run_seconds:.0f} s",
        "total wall time (this invocation)": f"{total:.0f} s",
    }
    title = (f"Mini-study, preset {preset.name}: {preset.title}, {len(splits['train']) + len(splits['val']) + len(splits['test'])} "
             f"real cases of {raw_dir.name}, {args.spacing:g} mm, {args.labeled_num} labelled")
    notes = [
        f"Split: {args.n_train} train ({args.labeled_num} labelled) / {args.n_val} val / {args.n_test} test, "
        f"seed {args.split_seed}. CPU protocol ({args.max_iterations} iterations, patch "
        f"{'x'.join(map(str, args.patch_size))}, width / {args.feature_scale}, scored at {args.spacing:g} mm): the "
        "numbers are not comparable with the papers' full-size runs.",
        "## Paired test against supervised-only\n\n" + summarise_results.format_paired_table(results),
    ]
    reproduce.write_report(work / "results.md", title, results, config, paper=None, missing=failed, notes=notes)
    reproduce.log(f"results in {work / 'results.md'} and {work / 'results.json'} ({len(results)} tests of {len(runs)} "
                  f"runs, {total:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
