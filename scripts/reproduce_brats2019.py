"""Reproduce the paper's Table 4 on BraTS2019: every method, 25 and 50 labelled cases, several seeds.

    python scripts/reproduce_brats2019.py --dry-run          # print the commands, run nothing
    python scripts/reproduce_brats2019.py --seeds 1337 1338 1339 --amp

For each method, labelled count and seed it trains with the method's entry script (``code/train_<method>_3D.py``,
``code/train_UGMCL_3D.py`` for UG-MCL) and the paper's hyper-parameters (the entry script's defaults: 96^3 patches,
batch 2 + 2, 30,000 iterations ...), then tests the best model on ``test.txt`` with ``code/test_3D_dt.py``, and
finally writes one Markdown table of mean ± std over the seeds beside the paper's numbers (``--out``, plus a
``.json`` with the same stem).

Learning rates (SPEC section 3): UG-MCL as released, SGD lr 0.01 constant; the SSL4MIS baselines (supervised,
Mean Teacher, UA-MT, entropy minimisation, URPC, DTC) lr 0.1 with poly decay lr * (1 - t/T)^0.9
(``--baseline_lr``, ``--baseline_poly`` / ``--no-baseline_poly``).

Run names: seed ``s`` of a method whose entry script's ``--exp`` is ``<exp>`` trains with ``--exp <exp>_seed<s>``,
i.e. into ``<model_dir>/<exp>_seed<s>_<labelled>/<model>/`` (the training script appends the labelled count), and is
tested with ``--exp <exp>_seed<s>_<labelled>``, so no two runs share a folder. Each run folder also gets
``train_console.log``, ``test_console.log`` (the scripts' output) and ``times.json`` (wall times).

Resumable: a run whose ``summary.json`` exists is skipped; a finished training (``checkpoint_latest.pth`` at the last
iteration and a best model) is only tested; an interrupted one is continued with ``--resume`` (else restarted).
Every script runs as a subprocess in ``code/``, so a crash ends that run only: the others go on, the failures are
listed at the end and the exit status is 1.

Relative paths on this command line are relative to the current folder; the commands get absolute paths, so the
printed ones run from ``code/`` (or anywhere).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
CODE_DIR = REPO / "code"
if str(CODE_DIR) not in sys.path:  # run as a script: the package modules live in code/
    sys.path.insert(0, str(CODE_DIR))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import summarise_results  # noqa: E402

from engine.config import TrainConfig  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402

__all__ = [
    "ENTRY_SCRIPTS",
    "TABLE4_METHODS",
    "Run",
    "RunSettings",
    "collect_results",
    "entry_defaults",
    "environment_info",
    "execute_run",
    "format_command",
    "git_commit",
    "log",
    "main",
    "make_runs",
    "plan_run",
    "print_plan",
    "run_command",
    "run_state",
    "test_command",
    "train_command",
    "write_report",
]

ENTRY_SCRIPTS: dict[str, str] = {
    "supervised": "train_supervised_3D.py",
    "mean_teacher": "train_mean_teacher_3D.py",
    "uamt": "train_uamt_3D.py",
    "entropy_min": "train_entropy_min_3D.py",
    "urpc": "train_urpc_3D.py",
    "dtc": "train_dtc_3D.py",
    "ugmcl": "train_UGMCL_3D.py",
}
"""``--method`` -> the training script in ``code/`` whose defaults are that method's published settings."""

TABLE4_METHODS: tuple[str, ...] = tuple(ENTRY_SCRIPTS)
"""The methods of the paper's Table 4, in its order."""

TEST_SCRIPT = "test_3D_dt.py"

# UG-MCL's optimiser as released (SPEC section 3: SGD lr 0.01, constant), read from the training defaults.
_UGMCL_LR, _UGMCL_SCHEDULE = TrainConfig().base_lr, TrainConfig().lr_schedule


def entry_defaults(method: str) -> tuple[str, str]:
    """``(exp, model)`` that ``method``'s entry script uses by default, read from its ``DEFAULTS``.

    Raises:
        ValueError: if ``method`` has no entry script.
    """
    if method not in ENTRY_SCRIPTS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(ENTRY_SCRIPTS)}")
    import train_UGMCL_3D

    module = importlib.import_module(ENTRY_SCRIPTS[method][: -len(".py")])
    defaults = module.DEFAULTS
    argv = [] if not isinstance(defaults, (list, tuple)) else [str(a) for a in defaults]
    # The thin scripts put their DEFAULTS before the user's options; parse them with the same parser.
    args = train_UGMCL_3D.build_parser(method=method).parse_args(argv)
    cfg = train_UGMCL_3D.config_from_args(args, method)  # options left None: the dataset's and method's defaults
    return str(cfg.exp), str(cfg.model)


@dataclass(frozen=True)
class Run:
    """One training + test run.

    Attributes:
        method: ``--method`` name.
        labeled_num: labelled training cases (first lines of ``train.txt``).
        seed: training seed.
        exp: the entry script's experiment name (``BraTs2019_UGMCL`` ...), without seed or labelled count.
        model: network name (``unet_3D_dt``, ``vnet_dt``, ``unet_3D_ds`` ...).
    """

    method: str
    labeled_num: int
    seed: int
    exp: str
    model: str

    @property
    def train_exp(self) -> str:
        """``--exp`` of the training: ``<exp>_seed<seed>``."""
        return f"{self.exp}_seed{self.seed}"

    @property
    def name(self) -> str:
        """``<exp>_seed<seed>_<labelled>``: the run folder and the test ``--exp``."""
        return f"{self.train_exp}_{self.labeled_num}"

    def folder(self, model_dir: Path) -> Path:
        return Path(model_dir) / self.name

    def train_dir(self, model_dir: Path) -> Path:
        return self.folder(model_dir) / self.model

    def summary_path(self, model_dir: Path) -> Path:
        return self.folder(model_dir) / f"{self.model}_predictions" / "summary.json"


def make_runs(
    methods: Sequence[str],
    labeled_nums: Sequence[int],
    seeds: Sequence[int],
    models: Mapping[str, str] | None = None,
) -> list[Run]:
    """Every ``(labelled, method, seed)`` combination, in that nesting order.

    Args:
        models: method -> network overriding the entry script's default (e.g. ``{"dtc": "vnet_dt"}``).

    Raises:
        ValueError: for an unknown method or a repeated method, labelled count or seed.
    """
    for what, values in (("method", methods), ("labelled count", labeled_nums), ("seed", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"each {what} may be given once, found {list(values)}")
    runs = []
    defaults = {method: entry_defaults(method) for method in methods}
    for labeled in labeled_nums:
        for method in methods:
            exp, model = defaults[method]
            model = (models or {}).get(method, model)
            runs.extend(Run(method, int(labeled), int(seed), exp, model) for seed in seeds)
    return runs


@dataclass(frozen=True)
class RunSettings:
    """What every run shares.

    Attributes:
        root_path: preprocessed data (``data/*.h5`` and the split lists).
        model_dir: parent of the run folders.
        max_iterations: training iterations.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        amp: mixed precision in training and test.
        baseline_lr: SGD learning rate of the baselines (UG-MCL keeps its released 0.01).
        baseline_poly: poly decay for the baselines (UG-MCL keeps its released constant rate).
        resume: continue interrupted trainings with ``--resume`` instead of restarting them.
        save_nifti: let the test write its NIfTI predictions (off: metrics only).
        train_args: further options for every training command (after the generated ones, so they win).
        test_args: further options for every test command.
        method_train_args: method -> further training options for that method only.
    """

    root_path: Path
    model_dir: Path
    max_iterations: int = 30000
    device: str = "auto"
    amp: bool = False
    baseline_lr: float = 0.1
    baseline_poly: bool = True
    resume: bool = False
    save_nifti: bool = False
    train_args: tuple[str, ...] = ()
    test_args: tuple[str, ...] = ()
    method_train_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def train_command(run: Run, s: RunSettings, resume: bool = False) -> list[str]:
    """``[script, options...]`` of the training (run it from ``code/``)."""
    if run.method == "ugmcl":
        lr, schedule = _UGMCL_LR, _UGMCL_SCHEDULE
    else:
        lr, schedule = s.baseline_lr, "poly" if s.baseline_poly else "constant"
    cmd = [
        ENTRY_SCRIPTS[run.method],
        "--root_path", str(s.root_path),
        "--model_dir", str(s.model_dir),
        "--exp", run.train_exp,
        "--model", run.model,
        "--labeled_num", str(run.labeled_num),
        "--max_iterations", str(s.max_iterations),
        "--base_lr", f"{lr:g}",
        "--lr_schedule", schedule,
        "--seed", str(run.seed),
        "--device", s.device,
    ]
    if s.amp:
        cmd.append("--amp")
    cmd += [*s.train_args, *s.method_train_args.get(run.method, ()), "--no_progress"]
    if resume:
        cmd.append("--resume")
    return cmd


def test_command(run: Run, s: RunSettings) -> list[str]:
    """``[script, options...]`` of the test on ``test.txt`` (run it from ``code/``)."""
    cmd = [
        TEST_SCRIPT,
        "--root_path", str(s.root_path),
        "--model_dir", str(s.model_dir),
        "--exp", run.name,
        "--model", run.model,
        "--split", "test",
        "--device", s.device,
    ]
    if s.amp:
        cmd.append("--amp")
    if not s.save_nifti:
        cmd.append("--no_save")
    cmd += [*s.test_args, "--no_progress"]
    return cmd


def format_command(cmd: Sequence[str], python: str | None = None) -> str:
    """One shell line ``<python> <script> <options>`` (quoted where needed), to run from ``code/``."""
    return shlex.join([python or os.path.abspath(sys.executable), *cmd])


def run_state(run: Run, s: RunSettings) -> str:
    """Where ``run`` stands: ``"tested"`` (summary.json exists), ``"trained"`` (the last checkpoint is at
    ``max_iterations`` and a best model exists), ``"interrupted"`` (a checkpoint before that) or ``"new"``."""
    if run.summary_path(s.model_dir).is_file():
        return "tested"
    train_dir = run.train_dir(s.model_dir)
    latest = train_dir / "checkpoint_latest.pth"
    if not latest.is_file():
        return "new"
    iteration = _checkpoint_iteration(latest)
    finished = iteration is not None and iteration >= s.max_iterations
    if finished and (train_dir / f"{run.model}_best_model.pth").is_file():
        return "trained"
    return "interrupted"


def _checkpoint_iteration(path: Path) -> int | None:
    """The ``iteration`` stored in ``checkpoint_latest.pth``, or None when it cannot be read."""
    import torch

    try:
        try:  # mmap: only the small entries are read, not the weights
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["iteration"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply not a finished training
        return None


def plan_run(run: Run, s: RunSettings, state: str | None = None) -> list[tuple[str, list[str]]]:
    """The steps still to do for ``run``: ``[("train", cmd), ("test", cmd)]``, fewer when partly done.

    ``state`` defaults to :func:`run_state`. An interrupted training is resumed with ``--resume`` when
    ``s.resume`` is set, else started again from iteration 0.
    """
    state = run_state(run, s) if state is None else state
    if state == "tested":
        return []
    steps: list[tuple[str, list[str]]] = []
    if state != "trained":
        steps.append(("train", train_command(run, s, resume=s.resume and state == "interrupted")))
    steps.append(("test", test_command(run, s)))
    return steps


def log(message: str) -> None:
    """One progress line with a timestamp."""
    print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {message}", flush=True)


def run_command(cmd: Sequence[str], log_path: Path) -> int:
    """Run ``cmd`` with this Python in ``code/``, its output appended to ``log_path``; return its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"\n$ cd {CODE_DIR} && {format_command(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                [os.path.abspath(sys.executable), *cmd], cwd=CODE_DIR, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        except OSError as err:
            out.write(f"could not start: {err}\n")
            return 127
    return proc.returncode


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _read_times(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def execute_run(
    run: Run,
    s: RunSettings,
    index: int,
    total: int,
    runner: Callable[[Sequence[str], Path], int] = run_command,
) -> bool:
    """Do what is left of ``run`` (see :func:`plan_run`), logging progress; return True when it ends tested.

    Wall times of the steps go to ``<run folder>/times.json`` (kept for later invocations).
    """
    label = f"[{index}/{total}] {run.name} ({run.method}, {run.labeled_num} labelled, seed {run.seed})"
    state = run_state(run, s)
    steps = plan_run(run, s, state)
    if not steps:
        log(f"{label}: already tested, skipped")
        return True
    if state == "interrupted":
        what = "resuming it" if s.resume else "restarting it (--resume continues)"
        log(f"{label}: interrupted training found; {what}")
    elif state == "trained":
        log(f"{label}: already trained, testing only")
    folder = run.folder(s.model_dir)
    times_path = folder / "times.json"
    for step, cmd in steps:
        log(f"{label}: {step} ...")
        t0 = time.time()
        console = folder / f"{step}_console.log"
        code = runner(cmd, console)
        seconds = time.time() - t0
        if code != 0:
            log(f"{label}: {step} FAILED (exit {code}) after {seconds:.0f} s; last lines of {console}:")
            print(_tail(console), flush=True)
            return False
        times = _read_times(times_path)
        times[f"{step}_seconds"] = round(seconds, 1)  # a resumed training: the part after the interruption only
        atomic_write_text(times_path, json.dumps(times, indent=2) + "\n")
        log(f"{label}: {step} done in {seconds:.0f} s")
    if not run.summary_path(s.model_dir).is_file():
        log(f"{label}: the test ended without writing {run.summary_path(s.model_dir)}")
        return False
    return True


def collect_results(runs: Sequence[Run], s: RunSettings) -> list[summarise_results.RunResult]:
    """The :class:`summarise_results.RunResult` of every run that has a ``summary.json`` (with its wall times)."""
    results = []
    for run in runs:
        path = run.summary_path(s.model_dir)
        if path.is_file():
            extra = _read_times(run.folder(s.model_dir) / "times.json")
            results.append(summarise_results.load_summary(path, run.method, run.labeled_num, run.seed, extra=extra))
    return results


def git_commit() -> str:
    """``<hash>`` of the checkout, ``+ local changes`` when it is dirty, or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info() -> dict[str, str]:
    """Git commit, Python and torch versions, CPU and GPU of this machine (for the results files)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "git commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {usable} usable of {os.cpu_count()} CPU threads",
        "cpu model": cpu,
    }
    if torch.cuda.is_available():
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return info


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root_path", type=Path, default=REPO / "data" / "BraTS2019",
                        help="preprocessed BraTS2019 (data/*.h5, train/val/test.txt) (default: %(default)s)")
    parser.add_argument("--model_dir", type=Path, default=REPO / "model",
                        help="parent of the run folders (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=TABLE4_METHODS, default=list(TABLE4_METHODS),
                        help="methods to run (default: all of Table 4)")
    parser.add_argument("--labeled_nums", type=int, nargs="+", default=[25, 50],
                        help="labelled counts (default: 25 50)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                        help="training seeds (default: 1337 1338 1339; 1337 is the released one)")
    parser.add_argument("--max_iterations", type=int, default=30000, help="training iterations (default: 30000)")
    parser.add_argument("--baseline_lr", type=float, default=0.1,
                        help="SGD learning rate of the SSL4MIS baselines (default: 0.1, SPEC section 3); "
                             "UG-MCL always uses its released 0.01")
    parser.add_argument("--baseline_poly", action=argparse.BooleanOptionalAction, default=True,
                        help="poly decay lr * (1 - t/T)^0.9 for the baselines (default: on, SPEC section 3; "
                             "--no-baseline_poly: constant); UG-MCL always uses its released constant rate")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision in training and test (default: off, as published)")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted trainings from checkpoint_latest.pth (default: restart them)")
    parser.add_argument("--save_nifti", action="store_true",
                        help="let the tests write NIfTI predictions (default: metrics only)")
    parser.add_argument("--train_args", default="",
                        help="extra options for every training command, one shell-quoted string")
    parser.add_argument("--test_args", default="", help="extra options for every test command, one shell-quoted string")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "brats2019_table4.md",
                        help="Markdown table (a .json with the same stem beside it) (default: %(default)s)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the commands still to run (one per line, runnable from code/) and exit")
    return parser


def print_plan(runs: Sequence[Run], s: RunSettings, extra_first: Sequence[str] = ()) -> None:
    """Dry run: the commands still to run, one per line; skipped runs and notes as ``#`` comments."""
    print(f"# run from {CODE_DIR}")
    for line in extra_first:
        print(line)
    for run in runs:
        state = run_state(run, s)
        if state == "tested":
            print(f"# skip {run.name}: {run.summary_path(s.model_dir)} exists")
            continue
        if state == "trained":
            print(f"# {run.name}: trained, test only")
        for _, cmd in plan_run(run, s, state):
            print(format_command(cmd))


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the whole protocol; return 0, or 1 when a run failed or the data are missing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_iterations < 1:
        parser.error(f"--max_iterations must be >= 1, got {args.max_iterations}")
    settings = RunSettings(
        root_path=_absolute(args.root_path),
        model_dir=_absolute(args.model_dir),
        max_iterations=args.max_iterations,
        device=args.device,
        amp=args.amp,
        baseline_lr=args.baseline_lr,
        baseline_poly=args.baseline_poly,
        resume=args.resume,
        save_nifti=args.save_nifti,
        train_args=tuple(shlex.split(args.train_args)),
        test_args=tuple(shlex.split(args.test_args)),
    )
    try:
        runs = make_runs(args.methods, args.labeled_nums, args.seeds)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        print_plan(runs, settings)
        return 0
    if not (settings.root_path / "train.txt").is_file():
        print(f"error: {settings.root_path / 'train.txt'} not found; preprocess BraTS2019 first "
              f"(code/preprocess_brats2019.py --out_dir {settings.root_path})", file=sys.stderr)
        return 1

    started = time.time()
    log(f"{len(runs)} runs: methods {' '.join(args.methods)}, labelled {' '.join(map(str, args.labeled_nums))}, "
        f"seeds {' '.join(map(str, args.seeds))}; run folders in {settings.model_dir}")
    failed = [run.name for i, run in enumerate(runs, 1) if not execute_run(run, settings, i, len(runs))]
    results = collect_results(runs, settings)
    config = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dry_run"},
        "ugmcl lr": f"{_UGMCL_LR:g} {_UGMCL_SCHEDULE}",
        **environment_info(),
        "wall time of this invocation": f"{time.time() - started:.0f} s",
    }
    write_report(args.out, "Table 4 reproduction on BraTS2019 (whole tumour, FLAIR)", results, config,
                 paper=summarise_results.PAPER_TABLE4, missing=failed)
    log(f"table written to {args.out} ({len(results)} of {len(runs)} runs tested)")
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


def write_report(
    out: Path,
    title: str,
    results: Sequence[summarise_results.RunResult],
    config: Mapping[str, Any],
    paper: Mapping[tuple[str, int], Mapping[str, float]] | None = None,
    missing: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> None:
    """Write ``out`` (Markdown: aggregated table, per-seed table, configuration) and ``out`` with ``.json``."""
    rows = summarise_results.aggregate(results)
    parts = [f"# {title}\n", f"Written {datetime.datetime.now():%Y-%m-%d %H:%M:%S}.\n"]
    parts.append("## Mean ± std over seeds\n")
    parts.append("Dice and Jaccard in %, HD95 and ASD in mm; std is the sample std over seeds (n/a for one seed). "
                 "NaN cases: test cases without a surface distance (empty prediction or label), left out of "
                 "HD95/ASD, summed over seeds.\n")
    parts.append(summarise_results.format_table(rows, paper))
    if paper is not None:
        parts.append("\nPaper numbers: Table 4 of Zhang et al. 2022 as given in SPEC section 4 (BraTS2019, 60 test "
                     "cases); n/a where the SPEC gives none.\n")
    for note in notes:
        parts.append(f"\n{note}\n")
    parts.append("\n## Per seed\n")
    parts.append(summarise_results.format_per_seed_table(results, extra_columns=("train_seconds", "test_seconds")))
    if missing:
        parts.append(f"\nFailed or untested runs (not in the tables): {', '.join(missing)}\n")
    parts.append("\n## Configuration\n")
    parts.append(summarise_results.format_config(config))
    atomic_write_text(out, "\n\n".join(part.strip("\n") for part in parts) + "\n")
    payload = {
        "title": title,
        "config": dict(config),
        "aggregates": [row.to_dict() for row in rows],
        "runs": [r.to_dict() for r in results],
        "failed": list(missing),
    }
    if paper is not None:
        payload["paper"] = [{"method": m, "labeled_num": n, **v} for (m, n), v in paper.items()]
    atomic_write_text(out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
