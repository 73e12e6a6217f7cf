"""Time the whole training loop (data loading, UG-MCL step, EMA, logging) and project the full run (issue #7).

Run from the repository root::

    python bench/bench_train_loop.py                                  # published size, 60 iterations per setting
    python bench/bench_train_loop.py --patch 32 --feature_scale 8 --iters 12 --skip 4 --shape 48 48 40   # quick
    python bench/bench_train_loop.py --original_code ../UG-MCL/code --iters 5 --skip 1   # and the released code

Unlike ``bench/bench_train.py`` (one step on a fixed batch in isolation), this runs ``code/train_UGMCL_3D.py``
itself, once per setting, on a synthetic pre-processed dataset (written to a temporary folder unless
``--root_path`` is given), and reads the per-iteration timestamps of its ``log.txt``. The seconds per iteration are
the median gap between consecutive iterations after the first ``--skip`` (cuDNN autotuning, worker start-up), so the
one validation at the end does not count; the projection is that times ``--project`` iterations (30,000, the
published schedule), without validation. Settings:

====================  ==============================================================================
``released``          ``--deterministic 1``, fp32, plain network: what the released script does
``fast``              ``--deterministic 0`` (cuDNN autotuning on CUDA) and ``--fast_network``
``fast+kept``         ``fast`` and ``--keep_freed_memory 1`` (on CPU glibc keeps freed memory throughout)
``fast+amp``          ``fast`` and ``--amp`` (bf16 autocast where supported, else fp16)
``gpu_max``           ``fast+amp``, ``--low_memory 0 --mc_chunk 0``: released order, all T teacher passes in
                      one forward (the fastest eager setting on a GPU with ~16 GB to spare)
``gpu_max+compile``   ``gpu_max`` with ``--compile 1`` (torch.compile / Inductor of both networks' forwards)
``fast+amp+compile``  ``fast+amp`` (low-memory order) with ``--compile 1``
``original``          the released research code itself (``--original_code DIR``, its ``code/`` folder), run
                      unchanged through ``bench/run_original_code.py``; published size only (96^3, batch 4)
====================  ==============================================================================

The compiled settings spend their first iterations compiling: give them a ``--skip`` past that (the whole-run
column shows the compile time). The last column is the loss of the last iteration, a sanity check: settings
that draw other random numbers (bf16, compiled dropout) differ in it. Peak memory is the largest resident set of
the training process or its loader workers (``ru_maxrss`` of the finished process tree).

``original`` answers "how fast is the released code here?" in the same run as ours. Its data set is a view of the
same cases: the released script takes cases 0-49 of ``train.txt`` as labelled and 50-249 as unlabelled, so the view
lists the training cases over and over up to 250 lines. It runs in a copy of ``--original_code``, so the released
checkout is not written to.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "code"
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic dataset writer of the tests
sys.path.insert(0, str(CODE))  # engine.trainer.logged_losses reads the logs

from bench_train import add_problem_size_arguments  # noqa: E402

from utils.device import check_device_argument  # noqa: E402

SETTINGS: dict[str, list[str]] = {
    "released": ["--deterministic", "1"],
    "fast": ["--deterministic", "0", "--fast_network"],
    "fast+kept": ["--deterministic", "0", "--fast_network", "--keep_freed_memory", "1"],
    "fast+amp": ["--deterministic", "0", "--fast_network", "--amp"],
    "gpu_max": ["--deterministic", "0", "--fast_network", "--amp", "--low_memory", "0", "--mc_chunk", "0"],
    "gpu_max+compile": ["--deterministic", "0", "--amp", "--low_memory", "0", "--mc_chunk", "0", "--compile", "1"],
    "fast+amp+compile": ["--deterministic", "0", "--amp", "--compile", "1"],
}
_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] iteration (\d+) : loss")


def last_loss(log: Path) -> float:
    """The loss of the last iteration logged in a trainer ``log.txt`` (NaN if none)."""
    from engine.trainer import logged_losses

    losses = logged_losses(log.read_text())
    return losses[-1] if losses else float("nan")


def iteration_times(log: Path) -> dict[int, float]:
    """``{iteration: seconds since the first logged line}`` from a trainer ``log.txt`` (midnight wrap handled)."""
    times: dict[int, float] = {}
    previous, offset = None, 0.0
    for line in log.read_text().splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        h, m, s, ms, it = (int(g) for g in match.groups())
        t = timedelta(hours=h, minutes=m, seconds=s, milliseconds=ms).total_seconds() + offset
        if previous is not None and t < previous:  # passed midnight
            offset += 86400.0
            t += 86400.0
        times[it] = previous = t
    return times


def seconds_per_iteration(times: dict[int, float], skip: int) -> float:
    """Median gap between consecutive logged iterations after the first ``skip``."""
    its = sorted(i for i in times if i > skip)
    gaps = [times[b] - times[a] for a, b in zip(its, its[1:]) if b == a + 1]
    if not gaps:
        raise ValueError(f"fewer than two consecutive iterations logged after iteration {skip}")
    return statistics.median(gaps)


def run_measured(cmd: list[str], cwd: Path, stderr_file: Path) -> dict[str, Any]:
    """Run ``cmd`` in ``cwd``; ``{"returncode", "wall", "peak_gb"}``, its stderr in ``stderr_file``.

    ``peak_gb`` is ``ru_maxrss`` of the finished process tree (the largest resident set of the process or of a child
    it waited for), in GiB. Linux and macOS (``os.wait4``).
    """
    with open(os.devnull, "w") as out, open(stderr_file, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"returncode": os.waitstatus_to_exitcode(status), "wall": wall, "peak_gb": usage.ru_maxrss * scale / 2**30}


def original_command(args: argparse.Namespace, root: Path, work: Path) -> tuple[list[str], Path, Path]:
    """The released script's command, its working folder and its log, on a 250-line view of ``root``'s cases."""
    code = work / "original_code"
    shutil.copytree(args.original_code, code, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    view = work / "original_data"
    view.mkdir()
    (view / "data").symlink_to((root / "data").resolve())
    cases = [line.strip() for line in (root / "train.txt").read_text().splitlines() if line.strip()]
    (view / "train.txt").write_text("".join(f"{cases[i % len(cases)]}\n" for i in range(250)))
    cmd = [
        sys.executable, str(ROOT / "bench" / "run_original_code.py"), "train_UGMCL_3D.py",
        "--root_path", str(view), "--exp", "original", "--max_iterations", str(args.iters),
    ]
    return cmd, code, work / "model" / "original_50" / "unet_3D_dt" / "log.txt"


def our_command(args: argparse.Namespace, name: str, root: Path, out: Path) -> list[str]:
    """``code/train_UGMCL_3D.py`` with the problem size of ``args`` and the flags of setting ``name``."""
    p = args.patch
    return [
        sys.executable, str(CODE / "train_UGMCL_3D.py"), "--root_path", str(root), "--model_dir", str(out),
        "--exp", name, "--labeled_num", str(args.labeled_num), "--patch_size", str(p), str(p), str(p),
        "--batch_size", str(args.batch), "--labeled_bs", str(args.labeled_bs), "--mc_passes", str(args.T),
        "--feature_scale", str(args.feature_scale), "--max_iterations", str(args.iters),
        "--val_interval", str(10**9), "--save_interval", str(10**9), "--num_workers", str(args.num_workers),
        "--stride_xy", str(min(64, p)), "--stride_z", str(min(64, p)),  # the released 64, or the patch if smaller
        "--device", args.device, "--no_progress", *SETTINGS[name],
    ]


def run_setting(args: argparse.Namespace, name: str, root: Path, work: Path) -> dict[str, Any]:
    """Train one setting; ``{"s_per_iter", "wall", "peak_gb", "loss"}``, or ``{"error": last line of its stderr}``."""
    work = work / name
    work.mkdir(parents=True)
    if name == "original":
        cmd, cwd, log = original_command(args, root, work)
    else:
        cmd, cwd = our_command(args, name, root, work / "runs"), CODE
        log = None
    r = run_measured(cmd, cwd, work / "stderr.txt")
    if r["returncode"] != 0:
        stderr = (work / "stderr.txt").read_text()
        print(stderr[-3000:], file=sys.stderr)
        lines = stderr.strip().splitlines() or [f"exit status {r['returncode']}"]
        return {"error": lines[-1][:200], "wall": r["wall"]}
    log = log or next((work / "runs").glob(f"{name}_{args.labeled_num}/*/log.txt"))
    per_iter = seconds_per_iteration(iteration_times(log), args.skip)
    return {"s_per_iter": per_iter, "wall": r["wall"], "peak_gb": r["peak_gb"], "loss": last_loss(log)}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_size_arguments(parser)
    parser.add_argument("--iters", type=int, default=60, help="iterations per setting. Default 60")
    parser.add_argument("--skip", type=int, default=10, help="first iterations left out of the timing. Default 10")
    parser.add_argument("--project", type=int, default=30000, help="iterations of the projected run. Default 30000")
    parser.add_argument("--num_workers", type=int, default=4, help="data-loading workers. Default 4")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]. Default auto")
    parser.add_argument("--root_path", default=None, help="pre-processed data (default: a synthetic temporary set)")
    parser.add_argument("--labeled_num", type=int, default=4, help="labelled training cases. Default 4")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 96], help="synthetic volume shape")
    parser.add_argument("--settings", nargs="+", default=["released", "fast", "fast+amp"],
                        choices=[*SETTINGS, "original"])
    parser.add_argument("--original_code", type=Path, default=None,
                        help="the released repository's code/ folder: adds the setting 'original' (96^3, batch 4)")
    args = parser.parse_args(argv)
    if args.original_code is not None:
        if not (args.original_code / "train_UGMCL_3D.py").is_file():
            parser.error(f"--original_code {args.original_code}: no train_UGMCL_3D.py there")
        if "original" not in args.settings:
            args.settings.insert(0, "original")
        # the released script fixes these (its prediction buffer is 96^3, its batch 4 with 2 labelled, T = 8)
        if (args.patch, args.batch, args.labeled_bs, args.T, args.feature_scale) != (96, 4, 2, 8, 4):
            parser.error("--original_code runs the released script, which fixes patch 96, batch 4, labeled_bs 2, "
                         "T 8 and feature_scale 4: leave those at their defaults")
    elif "original" in args.settings:
        parser.error("the setting 'original' needs --original_code")
    if args.iters < args.skip + 3:
        parser.error(f"--iters must be at least --skip + 3, got {args.iters} and {args.skip}")
    if min(args.shape) < args.patch:
        parser.error(f"--shape {args.shape} must be at least --patch {args.patch} on every axis")
    check_device_argument(parser, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        root = Path(args.root_path).resolve() if args.root_path else Path(tmp) / "data"  # the runs' cwd is code/
        if not args.root_path:
            from synthetic_h5 import write_synthetic_h5_dataset

            write_synthetic_h5_dataset(root, n_cases=12, shape=args.shape, seed=0, n_val=1, n_test=1)
        results = {}
        for name in args.settings:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = r = run_setting(args, name, root, Path(tmp) / "work")
            print(f"{name}: {r.get('error') or format(r['s_per_iter'], '.3f') + ' s/iter'}", file=sys.stderr, flush=True)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(
        f"\nUG-MCL training loop, patch {args.patch}^3, batch {args.batch} ({args.labeled_bs} labelled), T = {args.T}, "
        f"feature_scale {args.feature_scale}, {args.num_workers} loader workers, {where}, torch {torch.__version__}; "
        f"median of iterations {args.skip + 1}-{args.iters}\n"
    )
    ok = [name for name, r in results.items() if "error" not in r]
    # the released code itself if it ran, else our released-like setting, else the first setting that ran
    base_name = next((n for n in ("original", "released") if n in ok), ok[0] if ok else None)
    base = results[base_name] if base_name else None
    print(f"| setting | s/iter | speed-up vs {base_name} | peak memory | memory vs {base_name} "
          f"| projected {args.project:,} iterations | whole run (s) | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | - | - | - | - | {r['wall']:.0f} | - |")
            continue
        speed = f"{base['s_per_iter'] / r['s_per_iter']:.2f}x" if base else "-"
        memory = f"{r['peak_gb'] / base['peak_gb']:.0%}" if base else "-"
        hours = r["s_per_iter"] * args.project / 3600
        print(f"| {name} | {r['s_per_iter']:.3f} | {speed} | {r['peak_gb']:.2f} GB | {memory} | {hours:.2f} h "
              f"| {r['wall']:.0f} | {r['loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
