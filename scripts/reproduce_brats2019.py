"""Reproduce the paper's protocols: BraTS2019 (Table 4) or LA; every method, two labelled counts, several seeds.

    python scripts/reproduce_brats2019.py --dry-run                  # BraTS2019: print the commands, run nothing
    python scripts/reproduce_brats2019.py --seeds 1337 1338 1339 --amp
    python scripts/reproduce_brats2019.py --dataset la --dry-run     # LA (scripts/reproduce_la.sh does this)

``--dataset`` picks the protocol and fills in every option not given:

- ``brats2019`` (default): 25 and 50 labelled of ``train.txt``, 30,000 iterations, the entry scripts' defaults (96^3
  patches, U-Net, batch 2 + 2 ...), table ``results/brats2019_table4.md`` beside the paper's Table 4;
- ``la``: 16 and 8 labelled of the 80 cases of ``train.list``, tested on the 20 of ``test.list``; ``--dataset la`` of
  the training and test scripts gives V-Net (``vnet_dt``; URPC keeps its deep-supervision ``unet_3D_ds``), 112x112x80
  patches, 6000 iterations and lr 0.01 x 0.1 every 2500 iterations for every method (UA-MT / DTC / UG-MCL on LA);
  table ``results/la_table.md`` beside the paper's LA Dice with 16 labelled.

For each method, labelled count and seed it trains with the method's entry script (``code/train_<method>_3D.py``,
``code/train_UGMCL_3D.py`` for UG-MCL), then tests BOTH checkpoints on the test list with ``code/test_3D_dt.py``:

- ``best-val``: ``<model>_best_model.pth``, the weights of the best Dice on the *validation* list (``val.txt``),
  never picked on the test set (picking the checkpoint on the test set flatters a method); a dataset without a
  validation list (LA as published: ``train.list`` and ``test.list`` only) keeps the final weights as best-val, so
  there the two rows test the same weights;
- ``last``: ``<model>_last_model.pth``, the final weights.

and finally writes one Markdown table of mean ± std over the seeds, one row per method, labelled count and
checkpoint, beside the paper's numbers (``--out``, plus a ``.json`` with the same stem).

Learning rates on BraTS2019 (SPEC section 3): UG-MCL as released, SGD lr 0.01 constant; the SSL4MIS baselines
(supervised, Mean Teacher, UA-MT, entropy minimisation, URPC, DTC) lr 0.1 with poly decay lr * (1 - t/T)^0.9
(``--baseline_lr``, ``--baseline_poly`` / ``--no-baseline_poly``). On LA every method uses the dataset's 0.01 step
schedule (``--baseline_lr`` / ``--baseline_poly`` change the baselines' there too).

Run names: seed ``s`` of a method whose entry script's ``--exp`` is ``<exp>`` trains with ``--exp <exp>_seed<s>``,
i.e. into ``<model_dir>/<exp>_seed<s>_<labelled>/<model>/`` (the training script appends the labelled count), and is
tested with ``--exp <exp>_seed<s>_<labelled>``, so no two runs share a folder; on LA ``<exp>`` starts with ``LA_``
instead of ``BraTs2019_`` (``LA_UGMCL``, ``LA_DTC`` ...). The best-val test writes into
``<run folder>/<model>_predictions/``, the last one into ``<run folder>/<model>_predictions_last/``. Each run folder
also gets ``train_console.log``, ``test_console.log``, ``test_last_console.log`` (the scripts' output) and
``times.json`` (wall times).

Resumable: a run with both ``summary.json`` files is skipped; a finished training (``checkpoint_latest.pth`` at the
last iteration and a best model) is only tested, on the checkpoints not tested yet (a run tested on best-val only is
tested on last only; one trained before ``<model>_last_model.pth`` existed is tested on the final weights in
``checkpoint_latest.pth``); a run tested on one checkpoint is never trained again (when the other's weights are
gone it is skipped with a note); an interrupted one is continued with ``--resume`` (else restarted) and then tested
on both. Every script runs as a subprocess in ``code/``, so a crash ends that run only: the others go on, the failures
are listed at the end and the exit status is 1.

Relative paths on this command line are relative to the current folder; the commands get absolute paths, so the
printed ones run from ``code/`` (or anywhere).
"""

from __future__ import annotations

import argparse
import datetime
import functools
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

from dataloaders.datasets import DATASETS  # noqa: E402
from engine.config import TrainConfig  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402

__all__ = [
    "CHECKPOINTS",
    "ENTRY_SCRIPTS",
    "PAPER_LA",
    "PROTOCOLS",
    "TABLE4_METHODS",
    "Protocol",
    "Run",
    "RunSettings",
    "checkpoint_of",
    "collect_results",
    "entry_defaults",
    "environment_info",
    "execute_run",
    "format_command",
    "format_results_table",
    "git_commit",
    "log",
    "main",
    "make_runs",
    "plan_run",
    "print_plan",
    "run_command",
    "run_state",
    "test_command",
    "tests_left",
    "train_command",
    "ugmcl_optimiser",
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
    "mcnet_plus": "train_mcnet_plus_3D.py",
    "bcp": "train_bcp_3D.py",
}
"""``--method`` -> the training script in ``code/`` whose defaults are that method's published settings."""

TABLE4_METHODS: tuple[str, ...] = tuple(ENTRY_SCRIPTS)
"""The methods of the paper's Table 4, in its order, then the newer MC-Net+ and BCP."""

TEST_SCRIPT = "test_3D_dt.py"

CHECKPOINTS: tuple[str, ...] = ("best-val", "last")
"""The checkpoints every run is tested on: ``best-val`` (best Dice on the validation list, never the test set) and
``last`` (the final weights)."""

_CHECKPOINT_FILES = {"best-val": "{model}_best_model.pth", "last": "{model}_last_model.pth"}
_PREDICTION_DIRS = {"best-val": "{model}_predictions", "last": "{model}_predictions_last"}
_TEST_STEPS = {"best-val": "test", "last": "test_last"}  # step name: <step>_console.log, <step>_seconds

PAPER_LA: dict[tuple[str, int], dict[str, float]] = {
    ("supervised", 16): {"dice": 86.03},
    ("uamt", 16): {"dice": 88.88},
    ("dtc", 16): {"dice": 89.42},
    ("ugmcl", 16): {"dice": 90.16},
    ("mcnet_plus", 16): {"dice": 91.07},  # reported by MC-Net+ (Wu et al., MedIA 2022), not by the UG-MCL paper
    ("bcp", 16): {"dice": 90.1},  # about 90.1, as reported for BCP (Bai et al., CVPR 2023)
}
"""The paper's LA Dice (%) with 16 labelled (supervised = V-Net on the 16 labelled cases only); no other cell is
given here, so the others show "-" (not invented)."""

_PAPER_TABLE4_NOTE = ("Paper numbers: Table 4 of Zhang et al. 2022 as given in SPEC section 4 (BraTS2019, 60 test "
                      "cases); MC-Net+ 84.96 / 86.02 and BCP 84.17 (50 labelled) Dice as their own papers report them "
                      "on the same split; - where none is given.")
_PAPER_LA_NOTE = ("Paper numbers: the paper's LA Dice (%) with 16 labelled of 80 (20 test cases): supervised V-Net "
                  "86.03, UA-MT 88.88, DTC 89.42, UG-MCL 90.16; MC-Net+ 91.07 and BCP about 90.1 as their own "
                  "papers report them; - where none is given here (8 labelled, the other methods and metrics).")


@dataclass(frozen=True)
class Protocol:
    """What ``--dataset`` fills in where an option is not given.

    Attributes:
        dataset: the ``--dataset`` of the training and test scripts.
        title: the table's title.
        root_path, labeled_nums, max_iterations, out: defaults of those options.
        baseline_lr, baseline_schedule: the baselines' optimiser (UG-MCL's: :func:`ugmcl_optimiser`).
        paper, paper_note: the paper's numbers ``(method, labelled) -> metrics`` and where they come from.
        data_hint: how to get the data, for the error when the train list is missing (``{root}``: the folder).
    """

    dataset: str
    title: str
    root_path: Path
    labeled_nums: tuple[int, ...]
    max_iterations: int
    baseline_lr: float
    baseline_schedule: str
    out: Path
    paper: Mapping[tuple[str, int], Mapping[str, float]]
    paper_note: str
    data_hint: str


PROTOCOLS: dict[str, Protocol] = {
    "brats2019": Protocol(
        "brats2019", "Table 4 reproduction on BraTS2019 (whole tumour, FLAIR)", REPO / "data" / "BraTS2019",
        (25, 50), int(DATASETS["brats2019"].defaults["max_iterations"]), 0.1, "poly",
        REPO / "results" / "brats2019_table4.md", summarise_results.PAPER_TABLE4, _PAPER_TABLE4_NOTE,
        "preprocess BraTS2019 first (code/preprocess_brats2019.py --out_dir {root})",
    ),
    "la": Protocol(
        "la", "Reproduction on LA (left atrium, 80 training / 20 test cases)", REPO / "data" / "LA",
        (16, 8), int(DATASETS["la"].defaults["max_iterations"]), TrainConfig(dataset="la").base_lr,
        str(TrainConfig(dataset="la").lr_schedule), REPO / "results" / "la_table.md", PAPER_LA, _PAPER_LA_NOTE,
        "put the UA-MT LA tree there ({root}/2018LA_Seg_Training Set/<ID>/mri_norm2.h5, train.list, test.list; "
        "see data/README.md)",
    ),
}
"""``--dataset`` -> its protocol (the paper's settings on that dataset)."""


@functools.cache
def ugmcl_optimiser(dataset: str = "brats2019") -> tuple[float, str]:
    """``(lr, schedule)`` of UG-MCL on ``dataset``: the training defaults (brats2019: 0.01 constant, as released;
    la: 0.01 step)."""
    cfg = TrainConfig(dataset=dataset)
    return float(cfg.base_lr), str(cfg.lr_schedule)


def _exp_prefix(dataset: str) -> str:
    """``LA`` for la: the dataset's UG-MCL ``--exp`` without ``_UGMCL``."""
    exp = str(DATASETS[dataset].defaults.get("exp", "BraTs2019_UGMCL"))
    return exp[: -len("_UGMCL")] if exp.endswith("_UGMCL") else exp


def entry_defaults(method: str, dataset: str = "brats2019") -> tuple[str, str]:
    """``(exp, model)`` that ``method``'s entry script uses by default on ``dataset``, read from its ``DEFAULTS``.

    The thin baseline scripts name their runs ``BraTs2019_<Method>``; on another dataset that prefix becomes the
    dataset's (``LA_DTC`` ...), so the runs of two datasets never share a folder.

    Raises:
        ValueError: if ``method`` has no entry script, or ``dataset`` is unknown.
    """
    if method not in ENTRY_SCRIPTS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(ENTRY_SCRIPTS)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(sorted(DATASETS))}")
    import train_UGMCL_3D

    module = importlib.import_module(ENTRY_SCRIPTS[method][: -len(".py")])
    defaults = module.DEFAULTS
    argv = [] if not isinstance(defaults, (list, tuple)) else [str(a) for a in defaults]
    # The thin scripts put their DEFAULTS before the user's options; parse them with the same parser.
    args = train_UGMCL_3D.build_parser(method=method).parse_args([*argv, "--dataset", dataset])
    cfg = train_UGMCL_3D.config_from_args(args, method)  # options left None: the dataset's and method's defaults
    exp = str(cfg.exp)
    if dataset != "brats2019" and exp.startswith("BraTs2019_"):
        exp = f"{_exp_prefix(dataset)}_{exp[len('BraTs2019_'):]}"
    return exp, str(cfg.model)


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

    def checkpoint_path(self, model_dir: Path, checkpoint: str = "best-val") -> Path:
        """The weights file of ``checkpoint`` (``best-val``: ``<model>_best_model.pth``, ``last``:
        ``<model>_last_model.pth``)."""
        return self.train_dir(model_dir) / _CHECKPOINT_FILES[checkpoint].format(model=self.model)

    def predictions_dir(self, model_dir: Path, checkpoint: str = "best-val") -> Path:
        """The test's ``--out_dir``: ``<model>_predictions`` (best-val) or ``<model>_predictions_last``."""
        return self.folder(model_dir) / _PREDICTION_DIRS[checkpoint].format(model=self.model)

    def summary_path(self, model_dir: Path, checkpoint: str = "best-val") -> Path:
        return self.predictions_dir(model_dir, checkpoint) / "summary.json"


def make_runs(
    methods: Sequence[str],
    labeled_nums: Sequence[int],
    seeds: Sequence[int],
    models: Mapping[str, str] | None = None,
    dataset: str = "brats2019",
) -> list[Run]:
    """Every ``(labelled, method, seed)`` combination, in that nesting order.

    Args:
        models: method -> network overriding the entry script's default (e.g. ``{"dtc": "vnet_dt"}``).
        dataset: the ``--dataset`` whose defaults name the runs and pick the networks.

    Raises:
        ValueError: for an unknown method or a repeated method, labelled count or seed.
    """
    for what, values in (("method", methods), ("labelled count", labeled_nums), ("seed", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"each {what} may be given once, found {list(values)}")
    runs = []
    defaults = {method: entry_defaults(method, dataset) for method in methods}
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
        baseline_poly: poly decay for the baselines (UG-MCL keeps its released constant rate); off: constant.
        baseline_schedule: the baselines' ``--lr_schedule`` when given (``step`` on LA); None: ``baseline_poly``.
        dataset: ``--dataset`` of every training and test command (the layout and the papers' defaults).
        resume: continue interrupted trainings with ``--resume`` instead of restarting them.
        save_nifti: let the test write its NIfTI predictions (off: metrics only).
        train_args: further options for every training command (after the generated ones, so they win).
        test_args: further options for every test command.
        method_train_args: method -> further training options for that method only.
        optimiser: ``(lr, schedule)`` of every method, UG-MCL included (a study that compares methods at one
            optimiser); None: UG-MCL's published one and ``baseline_*`` for the others.
    """

    root_path: Path
    model_dir: Path
    max_iterations: int = 30000
    device: str = "auto"
    amp: bool = False
    baseline_lr: float = 0.1
    baseline_poly: bool = True
    baseline_schedule: str | None = None
    dataset: str = "brats2019"
    resume: bool = False
    save_nifti: bool = False
    train_args: tuple[str, ...] = ()
    test_args: tuple[str, ...] = ()
    method_train_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    optimiser: tuple[float, str] | None = None


def train_command(run: Run, s: RunSettings, resume: bool = False) -> list[str]:
    """``[script, options...]`` of the training (run it from ``code/``)."""
    if s.optimiser is not None:
        lr, schedule = s.optimiser
    elif run.method == "ugmcl":
        lr, schedule = ugmcl_optimiser(s.dataset)
    else:
        lr = s.baseline_lr
        schedule = s.baseline_schedule or ("poly" if s.baseline_poly else "constant")
    cmd = [
        ENTRY_SCRIPTS[run.method],
        "--dataset", s.dataset,
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


def test_command(run: Run, s: RunSettings, checkpoint: str = "best-val", weights: Path | None = None) -> list[str]:
    """``[script, options...]`` of the test of ``checkpoint`` on the test list (run it from ``code/``).

    Args:
        checkpoint: ``best-val`` or ``last`` (:data:`CHECKPOINTS`): the weights and the ``--out_dir``.
        weights: another file holding that checkpoint's weights (``checkpoint_latest.pth`` of a training that
            finished before ``<model>_last_model.pth`` was saved).
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; expected one of {', '.join(CHECKPOINTS)}")
    cmd = [
        TEST_SCRIPT,
        "--dataset", s.dataset,
        "--root_path", str(s.root_path),
        "--model_dir", str(s.model_dir),
        "--exp", run.name,
        "--model", run.model,
        "--checkpoint", str(weights if weights is not None else run.checkpoint_path(s.model_dir, checkpoint)),
        "--out_dir", str(run.predictions_dir(s.model_dir, checkpoint)),
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


def tests_left(run: Run, s: RunSettings) -> list[str]:
    """The checkpoints of :data:`CHECKPOINTS` whose ``summary.json`` is missing."""
    return [c for c in CHECKPOINTS if not run.summary_path(s.model_dir, c).is_file()]


def run_state(run: Run, s: RunSettings) -> str:
    """Where ``run`` stands: ``"tested"`` (the summary.json of every checkpoint exists), ``"trained"`` (the last
    checkpoint is at ``max_iterations`` and a best model exists), ``"interrupted"`` (a checkpoint before that) or
    ``"new"``.

    A run tested on some checkpoint is never trained again: it is ``"trained"`` when the weights of every checkpoint
    still to test are there (:func:`_weights_of`), else ``"partly tested"`` (nothing left that can be done).
    """
    left = tests_left(run, s)
    if not left:
        return "tested"
    state = _training_state(run, s)
    if len(left) < len(CHECKPOINTS) and state != "trained":
        return "trained" if all(_weights_of(run, s, c) is not None for c in left) else "partly tested"
    return state


def _training_state(run: Run, s: RunSettings) -> str:
    """``"trained"``, ``"interrupted"`` or ``"new"`` (see :func:`run_state`), from ``checkpoint_latest.pth``."""
    latest = run.train_dir(s.model_dir) / "checkpoint_latest.pth"
    if not latest.is_file():
        return "new"
    if _finished(run, s) and run.checkpoint_path(s.model_dir, "best-val").is_file():
        return "trained"
    return "interrupted"


def _finished(run: Run, s: RunSettings) -> bool:
    """Whether ``checkpoint_latest.pth`` exists and is at ``max_iterations`` (or later)."""
    latest = run.train_dir(s.model_dir) / "checkpoint_latest.pth"
    if not latest.is_file():
        return False
    iteration = _checkpoint_iteration(latest)
    return iteration is not None and iteration >= s.max_iterations


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


def _weights_of(run: Run, s: RunSettings, checkpoint: str) -> Path | None:
    """The file holding ``checkpoint``'s weights of a trained run, or None when there is none.

    ``last`` of a training that finished before ``<model>_last_model.pth`` was saved: ``checkpoint_latest.pth`` at
    ``max_iterations`` (it holds the same final weights; ``test_3D_dt.py`` reads its ``student``).
    """
    path = run.checkpoint_path(s.model_dir, checkpoint)
    if path.is_file():
        return path
    if checkpoint == "last" and _finished(run, s):
        return run.train_dir(s.model_dir) / "checkpoint_latest.pth"
    return None


def _fallback_note(run: Run, s: RunSettings, state: str) -> str | None:
    """A note when ``last`` will be tested from ``checkpoint_latest.pth``, or None."""
    if state != "trained" or "last" not in tests_left(run, s):
        return None
    weights = _weights_of(run, s, "last")
    if weights is None or weights == run.checkpoint_path(s.model_dir, "last"):
        return None
    return (f"no {run.checkpoint_path(s.model_dir, 'last').name} (trained before it was saved); last = the final "
            f"weights in {weights.name}")


def _tests_text(run: Run, s: RunSettings) -> str:
    """``only`` (both checkpoints untested) or ``last only`` ...: what a trained run still needs."""
    left = tests_left(run, s)
    return "only" if len(left) == len(CHECKPOINTS) else f"{' and '.join(left)} only"


def _partly_tested_note(run: Run, s: RunSettings) -> str:
    left = tests_left(run, s)
    done = [c for c in CHECKPOINTS if c not in left]
    return (f"tested on {' and '.join(done)} only, and the weights of {' and '.join(left)} are gone "
            f"({run.train_dir(s.model_dir)}); not trained again (remove {run.predictions_dir(s.model_dir)} "
            f"to train and test it anew)")


def plan_run(run: Run, s: RunSettings, state: str | None = None) -> list[tuple[str, list[str]]]:
    """The steps still to do for ``run``: ``[("train", cmd), ("test", cmd), ("test_last", cmd)]``, fewer when partly
    done (``test``: the best-val checkpoint, ``test_last``: the last one).

    ``state`` defaults to :func:`run_state`. A finished training is tested on the checkpoints not tested yet; a
    training that runs (again) is tested on both afterwards. An interrupted training is resumed with ``--resume``
    when ``s.resume`` is set, else started again from iteration 0.
    """
    state = run_state(run, s) if state is None else state
    if state in ("tested", "partly tested"):
        return []
    steps: list[tuple[str, list[str]]] = []
    if state != "trained":
        steps.append(("train", train_command(run, s, resume=s.resume and state == "interrupted")))
        todo = list(CHECKPOINTS)  # new weights: earlier summaries, if any, are out of date
    else:
        todo = tests_left(run, s)
    for checkpoint in todo:
        weights = _weights_of(run, s, checkpoint) if state == "trained" else None
        steps.append((_TEST_STEPS[checkpoint], test_command(run, s, checkpoint, weights)))
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
    if state == "partly tested":
        log(f"{label}: {_partly_tested_note(run, s)}; skipped")
        return True
    if not steps:
        log(f"{label}: already tested ({' and '.join(CHECKPOINTS)}), skipped")
        return True
    if state == "interrupted":
        what = "resuming it" if s.resume else "restarting it (--resume continues)"
        log(f"{label}: interrupted training found; {what}")
    elif state == "trained":
        log(f"{label}: already trained, testing {_tests_text(run, s)}")
    note = _fallback_note(run, s, state)
    if note is not None:
        log(f"{label}: {note}")
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
    missing = [str(run.summary_path(s.model_dir, c)) for c in tests_left(run, s)]
    if missing:
        log(f"{label}: the test ended without writing {', '.join(missing)}")
        return False
    return True


def checkpoint_of(result: summarise_results.RunResult) -> str:
    """The checkpoint a result was tested on (``extra["checkpoint"]``; ``best-val`` when not recorded)."""
    return str(result.extra.get("checkpoint", "best-val"))


def collect_results(runs: Sequence[Run], s: RunSettings) -> list[summarise_results.RunResult]:
    """The :class:`summarise_results.RunResult` of every run and checkpoint that has a ``summary.json``.

    ``extra`` holds ``checkpoint`` (``best-val`` / ``last``) and the wall times: ``train_seconds`` and
    ``test_seconds`` on the best-val result, that checkpoint's ``test_seconds`` on the last one (so a sum over the
    results counts each training once).
    """
    results = []
    for run in runs:
        times = _read_times(run.folder(s.model_dir) / "times.json")
        for checkpoint in CHECKPOINTS:
            path = run.summary_path(s.model_dir, checkpoint)
            if not path.is_file():
                continue
            if checkpoint == "best-val":
                extra = {"checkpoint": checkpoint, **times}
                extra.pop("test_last_seconds", None)
            else:
                extra = {"checkpoint": checkpoint}
                if "test_last_seconds" in times:
                    extra["test_seconds"] = times["test_last_seconds"]
            results.append(summarise_results.load_summary(path, run.method, run.labeled_num, run.seed, extra=extra))
    return results


def aggregate_by_checkpoint(
    results: Sequence[summarise_results.RunResult],
) -> list[tuple[str, summarise_results.Aggregate]]:
    """``(checkpoint, aggregate over seeds)`` per method, labelled count and checkpoint, sorted by labelled count,
    method (paper order) and checkpoint (best-val first)."""
    checkpoints = list(dict.fromkeys([*CHECKPOINTS, *(checkpoint_of(r) for r in results)]))
    order = list(summarise_results.METHOD_NAMES)
    rows = [
        (checkpoint, row)
        for checkpoint in checkpoints
        for row in summarise_results.aggregate([r for r in results if checkpoint_of(r) == checkpoint])
    ]

    def key(item: tuple[str, summarise_results.Aggregate]) -> tuple[int, int, str, int]:
        checkpoint, row = item
        method_rank = order.index(row.method) if row.method in order else len(order)
        return row.labeled_num, method_rank, row.method, checkpoints.index(checkpoint)

    return sorted(rows, key=key)


def format_results_table(
    results: Sequence[summarise_results.RunResult],
    paper: Mapping[tuple[str, int], Mapping[str, float]] | None = None,
    digits: int = 2,
) -> str:
    """Markdown table, one row per method, labelled count and checkpoint (column "Checkpoint": best-val / last):
    ``mean ± std`` over the seeds of each metric.

    With ``paper``, a "paper <metric>" column follows each metric the paper gives for some row, with the paper's
    value for that method and labelled count on both checkpoint rows ("-" where it gives none).
    """
    headers = summarise_results._HEADERS  # the same column names as summarise_results' tables
    paper_metrics = {m for values in (paper or {}).values() for m in values}
    header = ["Method", "Labelled", "Seeds", "Checkpoint"]
    for metric in summarise_results.METRICS:
        header.append(headers[metric])
        if metric in paper_metrics:
            header.append(f"paper {headers[metric]}")
    header.append("NaN cases")
    lines = [_md_row(header), _md_row(["---"] * 4 + ["---:"] * (len(header) - 4))]
    for checkpoint, row in aggregate_by_checkpoint(results):
        cells = [summarise_results.METHOD_NAMES.get(row.method, row.method), str(row.labeled_num),
                 str(len(row.seeds)), checkpoint]
        for metric in summarise_results.METRICS:
            cells.append(summarise_results._mean_std(
                row.mean[metric], row.std[metric], digits, row.n_values[metric], len(row.seeds)))
            if metric in paper_metrics:
                ref = (paper or {}).get((row.method, row.labeled_num), {}).get(metric)
                cells.append("-" if ref is None else f"{ref:.{digits}f}")
        cells.append(f"{row.n_nan_cases}/{row.n_cases}")
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


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
    parser.add_argument("--dataset", choices=sorted(PROTOCOLS), default="brats2019",
                        help="the protocol: brats2019 (paper Table 4) or la (the paper's LA table); it gives the "
                             "defaults of the options below and is passed to every training and test "
                             "(default: %(default)s)")
    parser.add_argument("--root_path", type=Path, default=None,
                        help="the data: preprocessed BraTS2019 (data/*.h5, train/val/test.txt), default "
                             f"{PROTOCOLS['brats2019'].root_path}; LA (the UA-MT tree: train.list, test.list), "
                             f"default {PROTOCOLS['la'].root_path}")
    parser.add_argument("--model_dir", type=Path, default=REPO / "model",
                        help="parent of the run folders (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=TABLE4_METHODS, default=list(TABLE4_METHODS),
                        help="methods to run (default: all of Table 4)")
    parser.add_argument("--labeled_nums", type=int, nargs="+", default=None,
                        help="labelled counts (default: 25 50 on brats2019, 16 8 on la)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                        help="training seeds (default: 1337 1338 1339; 1337 is the released one)")
    parser.add_argument("--max_iterations", type=int, default=None,
                        help="training iterations (default: 30000 on brats2019, 6000 on la)")
    parser.add_argument("--baseline_lr", type=float, default=None,
                        help="SGD learning rate of the baselines (default: 0.1 on brats2019, SPEC section 3; 0.01 "
                             "on la); UG-MCL always uses its own (0.01)")
    parser.add_argument("--baseline_poly", action=argparse.BooleanOptionalAction, default=None,
                        help="poly decay lr * (1 - t/T)^0.9 for the baselines, --no-baseline_poly: constant "
                             "(default: poly on brats2019, SPEC section 3; on la the dataset's step schedule, "
                             "x 0.1 every 2500 iterations); UG-MCL always uses its own (brats2019 constant, la step)")
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
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown table (a .json with the same stem beside it) (default: "
                             f"{PROTOCOLS['brats2019'].out} on brats2019, {PROTOCOLS['la'].out} on la)")
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
            summaries = " and ".join(str(run.summary_path(s.model_dir, c)) for c in CHECKPOINTS)
            print(f"# skip {run.name}: {summaries} exist")
            continue
        if state == "partly tested":
            print(f"# skip {run.name}: {_partly_tested_note(run, s)}")
            continue
        if state == "trained":
            print(f"# {run.name}: trained, test {_tests_text(run, s)}")
            note = _fallback_note(run, s, state)
            if note is not None:
                print(f"# {run.name}: {note}")
        for _, cmd in plan_run(run, s, state):
            print(format_command(cmd))


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the whole protocol; return 0, or 1 when a run failed or the data are missing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.dataset]
    # The options left out take the protocol's values (and are shown so in the results' configuration).
    if args.root_path is None:
        args.root_path = protocol.root_path
    if args.labeled_nums is None:
        args.labeled_nums = list(protocol.labeled_nums)
    if args.max_iterations is None:
        args.max_iterations = protocol.max_iterations
    if args.baseline_lr is None:
        args.baseline_lr = protocol.baseline_lr
    if args.out is None:
        args.out = protocol.out
    if args.max_iterations < 1:
        parser.error(f"--max_iterations must be >= 1, got {args.max_iterations}")
    if args.baseline_poly is None:
        baseline_schedule = protocol.baseline_schedule
    else:
        baseline_schedule = "poly" if args.baseline_poly else "constant"
    settings = RunSettings(
        root_path=_absolute(args.root_path),
        model_dir=_absolute(args.model_dir),
        max_iterations=args.max_iterations,
        device=args.device,
        amp=args.amp,
        baseline_lr=args.baseline_lr,
        baseline_poly=baseline_schedule == "poly",
        baseline_schedule=baseline_schedule,
        dataset=args.dataset,
        resume=args.resume,
        save_nifti=args.save_nifti,
        train_args=tuple(shlex.split(args.train_args)),
        test_args=tuple(shlex.split(args.test_args)),
    )
    try:
        runs = make_runs(args.methods, args.labeled_nums, args.seeds, dataset=args.dataset)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        print_plan(runs, settings)
        return 0
    train_list = DATASETS[args.dataset].split_path(settings.root_path, "train")
    if not train_list.is_file():
        print(f"error: {train_list} not found; {protocol.data_hint.format(root=settings.root_path)}", file=sys.stderr)
        return 1

    started = time.time()
    log(f"{len(runs)} runs on {args.dataset}: methods {' '.join(args.methods)}, labelled "
        f"{' '.join(map(str, args.labeled_nums))}, seeds {' '.join(map(str, args.seeds))}; each tested on "
        f"{' and '.join(CHECKPOINTS)}; run folders in {settings.model_dir}")
    failed = [run.name for i, run in enumerate(runs, 1) if not execute_run(run, settings, i, len(runs))]
    results = collect_results(runs, settings)
    ugmcl_lr, ugmcl_schedule = ugmcl_optimiser(args.dataset)
    config = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dry_run"},
        "baseline lr schedule": baseline_schedule,
        "ugmcl lr": f"{ugmcl_lr:g} {ugmcl_schedule}",
        **environment_info(),
        "wall time of this invocation": f"{time.time() - started:.0f} s",
    }
    write_report(args.out, protocol.title, results, config, paper=protocol.paper, missing=failed,
                 paper_note=protocol.paper_note)
    log(f"table written to {args.out} ({len({(r.method, r.labeled_num, r.seed) for r in results})} of {len(runs)} "
        f"runs tested)")
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


CHECKPOINT_NOTE = (
    "Checkpoint: best-val = <model>_best_model.pth, the weights of the best Dice on the validation list (val.txt), "
    "picked on the validation list, never on the test set; last = <model>_last_model.pth, the final weights. A "
    "dataset without a validation list (LA as published) keeps the final weights as best-val, so there both rows "
    "test the same weights."
)
"""The table's note on the two checkpoints."""


def write_report(
    out: Path,
    title: str,
    results: Sequence[summarise_results.RunResult],
    config: Mapping[str, Any],
    paper: Mapping[tuple[str, int], Mapping[str, float]] | None = None,
    missing: Sequence[str] = (),
    notes: Sequence[str] = (),
    paper_note: str = _PAPER_TABLE4_NOTE,
) -> None:
    """Write ``out`` (Markdown: aggregated table with one row per checkpoint, per-seed table, configuration) and
    ``out`` with ``.json``."""
    rows = aggregate_by_checkpoint(results)
    parts = [f"# {title}\n", f"Written {datetime.datetime.now():%Y-%m-%d %H:%M:%S}.\n"]
    parts.append("## Mean ± std over seeds\n")
    parts.append("Dice and Jaccard in %, HD95 and ASD in mm; std is the sample std over seeds (n/a for one seed). "
                 "NaN cases: test cases without a surface distance (empty prediction or label), left out of "
                 "HD95/ASD, summed over seeds.\n")
    parts.append(format_results_table(results, paper))
    parts.append(f"\n{CHECKPOINT_NOTE}\n")
    if paper is not None:
        parts.append(f"\n{paper_note}\n")
    for note in notes:
        parts.append(f"\n{note}\n")
    parts.append("\n## Per seed\n")
    parts.append("train (s): on the best-val row of each run (one training, two tests).\n")
    parts.append(summarise_results.format_per_seed_table(
        results, extra_columns=("checkpoint", "train_seconds", "test_seconds")))
    if missing:
        parts.append(f"\nFailed or untested runs (not in the tables): {', '.join(missing)}\n")
    parts.append("\n## Configuration\n")
    parts.append(summarise_results.format_config(config))
    atomic_write_text(out, "\n\n".join(part.strip("\n") for part in parts) + "\n")
    payload = {
        "title": title,
        "config": dict(config),
        "aggregates": [{**row.to_dict(), "checkpoint": checkpoint} for checkpoint, row in rows],
        "runs": [{**r.to_dict(), "checkpoint": checkpoint_of(r)} for r in results],
        "failed": list(missing),
    }
    if paper is not None:
        payload["paper"] = [{"method": m, "labeled_num": n, **v} for (m, n), v in paper.items()]
    atomic_write_text(out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
