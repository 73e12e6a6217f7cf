"""Collect the ``summary.json`` of several test runs into one Markdown table: mean +- std over seeds.

Library (used by ``reproduce_brats2019.py`` and ``mini_study.py``) and command line::

    python scripts/summarise_results.py model/BraTs2019_*_seed*_*/*_predictions/summary.json \\
        --paper --out results/table.md

Each ``summary.json`` is what ``code/test_3D_dt.py`` writes. Its run is named by the test ``--exp``
(``config.exp`` in the file, else the folder above the predictions folder): ``<exp>_seed<seed>_<labelled>``, the
folder that ``train_*_3D.py --exp <exp>_seed<seed> --labeled_num <labelled>`` trains into. ``<exp>`` gives the
method (``BraTs2019_UGMCL`` -> ``ugmcl`` ...; an unknown one is kept as it is).

Dice and Jaccard are reported in %, HD95 and ASD in mm (= voxels at 1 mm). The spread is the sample standard
deviation over seeds (``n - 1`` in the denominator), so a single seed has none ("n/a"). A case whose prediction or
label is empty has no surface distance: ``test_3D_dt.py`` leaves it out of that run's HD95/ASD mean and counts
it; the tables add these counts up ("NaN cases") instead of hiding them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CODE_DIR = Path(__file__).resolve().parents[1] / "code"
if str(CODE_DIR) not in sys.path:  # run as a script: the package modules live in code/
    sys.path.insert(0, str(CODE_DIR))

from utils.atomic import atomic_write_text  # noqa: E402

__all__ = [
    "PairedTest",
    "case_metrics",
    "format_paired_table",
    "paired_test",
    "KNOWN_EXPS",
    "METHOD_NAMES",
    "METRICS",
    "PAPER_TABLE4",
    "Aggregate",
    "RunResult",
    "aggregate",
    "format_config",
    "format_per_seed_table",
    "format_table",
    "load_summary",
    "main",
    "parse_run_name",
]

METRICS: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd")
"""Reported metrics, in table order."""

_HEADERS = {"dice": "Dice %", "jaccard": "Jaccard %", "hd95": "HD95 (mm)", "asd": "ASD (mm)"}
_PERCENT = ("dice", "jaccard")

METHOD_NAMES: dict[str, str] = {
    "supervised": "Supervised only",
    "mean_teacher": "Mean Teacher",
    "uamt": "UA-MT",
    "entropy_min": "Entropy minimisation",
    "urpc": "URPC",
    "dtc": "DTC",
    "ugmcl": "UG-MCL",
    "mcnet_plus": "MC-Net+",
    "bcp": "BCP",
}
"""``--method`` name -> name in the tables (paper Table 4 order, then the newer methods)."""

KNOWN_EXPS: dict[str, str] = {
    "BraTs2019_UGMCL": "ugmcl",
    "BraTs2019_Supervised": "supervised",
    "BraTs2019_Mean_Teacher": "mean_teacher",
    "BraTs2019_UAMT": "uamt",
    "BraTs2019_Entropy_Minimization": "entropy_min",
    "BraTs2019_DTC": "dtc",
    "BraTs2019_URPC": "urpc",
    "BraTs2019_MCNetPlus": "mcnet_plus",
    "BraTs2019_BCP": "bcp",
}
"""Default ``--exp`` of each entry script (``code/train_*_3D.py``) -> its ``--method``."""

PAPER_TABLE4: dict[tuple[str, int], dict[str, float]] = {
    ("ugmcl", 25): {"dice": 82.82, "jaccard": 72.77, "hd95": 11.29, "asd": 2.30},
    ("supervised", 25): {"dice": 73.00, "jaccard": 59.96, "hd95": 42.64, "asd": 2.96},
    ("ugmcl", 50): {"dice": 83.61, "jaccard": 73.98, "hd95": 11.44, "asd": 2.26},
    ("supervised", 50): {"dice": 76.14, "jaccard": 64.15, "hd95": 36.01, "asd": 2.70},
    ("mcnet_plus", 25): {"dice": 84.96},  # reported by MC-Net+ (Wu et al., MedIA 2022) on this split
    ("mcnet_plus", 50): {"dice": 86.02},
    ("bcp", 50): {"dice": 84.17},  # reported for BCP (Bai et al., CVPR 2023) on this split
}
"""Paper Table 4 (BraTS2019, 60 test cases) as given in SPEC section 4: ``(method, labelled) -> metrics``
(Dice/Jaccard in %, HD95/ASD in mm). The other baselines' numbers are not in the SPEC and show as "n/a"."""

_RUN_NAME = re.compile(r"^(?P<exp>.+)_seed(?P<seed>\d+)_(?P<labeled>\d+)$")


@dataclass(frozen=True)
class RunResult:
    """The test result of one run (one method, labelled count and seed).

    Attributes:
        method: ``--method`` name (``ugmcl`` ...), or the experiment name when it is not a known one.
        labeled_num: labelled training cases.
        seed: training seed.
        metrics: metric -> mean over the test cases (Dice/Jaccard in %, HD95/ASD in mm); NaN when no case had one.
        n_cases: test cases.
        n_nan: metric -> cases left out of that mean (empty prediction or label).
        path: the ``summary.json`` read.
        extra: anything else the caller wants to keep beside the run (wall times ...).
    """

    method: str
    labeled_num: int
    seed: int
    metrics: Mapping[str, float]
    n_cases: int
    n_nan: Mapping[str, int]
    path: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "labeled_num": self.labeled_num,
            "seed": self.seed,
            "metrics": {k: _json_number(v) for k, v in self.metrics.items()},
            "n_cases": self.n_cases,
            "n_nan": dict(self.n_nan),
            "path": self.path,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


@dataclass(frozen=True)
class Aggregate:
    """Mean and sample std over the seeds of one ``(method, labeled_num)``.

    Attributes:
        mean, std: metric -> value (NaN when no seed has a value; std NaN with fewer than two).
        n_values: metric -> seeds that had a value.
        n_nan_cases, n_cases: summed over the seeds (HD95's NaN count: the empty masks).
    """

    method: str
    labeled_num: int
    seeds: tuple[int, ...]
    mean: Mapping[str, float]
    std: Mapping[str, float]
    n_values: Mapping[str, int]
    n_nan_cases: int
    n_cases: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "labeled_num": self.labeled_num,
            "seeds": list(self.seeds),
            "mean": {k: _json_number(v) for k, v in self.mean.items()},
            "std": {k: _json_number(v) for k, v in self.std.items()},
            "n_values": dict(self.n_values),
            "n_nan_cases": self.n_nan_cases,
            "n_cases": self.n_cases,
        }


def parse_run_name(name: str) -> tuple[str, int, int]:
    """Split ``<exp>_seed<seed>_<labelled>`` into ``(method, labelled, seed)``.

    ``<exp>`` is mapped through :data:`KNOWN_EXPS`; an unknown one is returned as the method.

    Raises:
        ValueError: if ``name`` does not have that form.
    """
    match = _RUN_NAME.match(name)
    if match is None:
        raise ValueError(
            f"run name {name!r} is not of the form <exp>_seed<seed>_<labelled>, e.g. BraTs2019_UGMCL_seed1337_25"
        )
    exp = match.group("exp")
    return KNOWN_EXPS.get(exp, exp), int(match.group("labeled")), int(match.group("seed"))


def load_summary(
    path: str | Path,
    method: str | None = None,
    labeled_num: int | None = None,
    seed: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> RunResult:
    """Read one ``summary.json`` of ``test_3D_dt.py``.

    Args:
        path: the file.
        method, labeled_num, seed: the run's identity; each one not given is parsed from the run name
            (``config.exp`` in the file, else the name of the folder above the predictions folder).
        extra: kept in :attr:`RunResult.extra`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not valid JSON, lacks a metric, or the run name cannot be parsed when needed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summary file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    metrics_in = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics_in, dict):
        raise ValueError(f"{path} has no 'metrics' object; expected the summary.json written by test_3D_dt.py")
    if method is None or labeled_num is None or seed is None:
        name = str((data.get("config") or {}).get("exp") or path.parent.parent.name)
        parsed = parse_run_name(name)
        method = parsed[0] if method is None else method
        labeled_num = parsed[1] if labeled_num is None else labeled_num
        seed = parsed[2] if seed is None else seed
    units = data.get("units") or {}
    metrics: dict[str, float] = {}
    n_nan: dict[str, int] = {}
    for metric in METRICS:
        entry = metrics_in.get(metric)
        if not isinstance(entry, dict) or "mean" not in entry:
            raise ValueError(f"{path} lacks metrics.{metric}.mean (found metrics {sorted(metrics_in)})")
        value = math.nan if entry["mean"] is None else float(entry["mean"])
        # test_3D_dt.py stores Dice/Jaccard as fractions and says so in "units"; a file in % is taken as it is.
        if metric in _PERCENT and units.get(metric, "fraction") == "fraction":
            value *= 100.0
        metrics[metric] = value
        n_nan[metric] = int(entry.get("n_nan") or 0)
    return RunResult(
        method=method,
        labeled_num=int(labeled_num),
        seed=int(seed),
        metrics=metrics,
        n_cases=int(data.get("n_cases") or 0),
        n_nan=n_nan,
        path=str(path),
        extra=dict(extra or {}),
    )


def aggregate(results: Iterable[RunResult], method_order: Sequence[str] | None = None) -> list[Aggregate]:
    """Group by ``(method, labeled_num)``: mean and sample std (``ddof=1``) of each metric over the seeds.

    A run whose metric is NaN (no case had one) is left out of that metric's mean; ``n_values`` says how many
    seeds remain. Groups come sorted by labelled count, then by ``method_order`` (default: paper Table 4 order,
    unknown methods last, alphabetically).

    Raises:
        ValueError: if the same ``(method, labeled_num, seed)`` appears twice.
    """
    groups: dict[tuple[str, int], list[RunResult]] = {}
    seen: set[tuple[str, int, int]] = set()
    for result in results:
        key = (result.method, result.labeled_num, result.seed)
        if key in seen:
            raise ValueError(f"run {key} (method, labelled, seed) is given twice; the second is {result.path}")
        seen.add(key)
        groups.setdefault((result.method, result.labeled_num), []).append(result)
    order = list(method_order) if method_order is not None else list(METHOD_NAMES)

    def sort_key(key: tuple[str, int]) -> tuple[int, int, str]:
        method, labeled = key
        return labeled, order.index(method) if method in order else len(order), method

    rows = []
    for key in sorted(groups, key=sort_key):
        runs = sorted(groups[key], key=lambda r: r.seed)
        mean, std, n_values = {}, {}, {}
        for metric in METRICS:
            values = [r.metrics[metric] for r in runs if not math.isnan(r.metrics[metric])]
            n_values[metric] = len(values)
            mean[metric] = sum(values) / len(values) if values else math.nan
            if len(values) >= 2:
                std[metric] = math.sqrt(sum((v - mean[metric]) ** 2 for v in values) / (len(values) - 1))
            else:
                std[metric] = math.nan
        rows.append(
            Aggregate(
                method=key[0],
                labeled_num=key[1],
                seeds=tuple(r.seed for r in runs),
                mean=mean,
                std=std,
                n_values=n_values,
                n_nan_cases=sum(r.n_nan.get("hd95", 0) for r in runs),
                n_cases=sum(r.n_cases for r in runs),
            )
        )
    return rows


def format_table(
    rows: Sequence[Aggregate],
    paper: Mapping[tuple[str, int], Mapping[str, float]] | None = None,
    digits: int = 2,
) -> str:
    """Markdown table, one row per ``(method, labelled)``: ``mean ± std`` of each metric over the seeds.

    With ``paper`` (e.g. :data:`PAPER_TABLE4`), the paper's value follows each metric ("n/a" where it has none).
    """
    header = ["Method", "Labelled", "Seeds"]
    for metric in METRICS:
        header.append(_HEADERS[metric])
        if paper is not None:
            header.append(f"paper {_HEADERS[metric]}")
    header.append("NaN cases")
    lines = [_md_row(header), _md_row(["---"] * 3 + ["---:"] * (len(header) - 3))]
    for row in rows:
        cells = [METHOD_NAMES.get(row.method, row.method), str(row.labeled_num), str(len(row.seeds))]
        for metric in METRICS:
            cells.append(_mean_std(row.mean[metric], row.std[metric], digits, row.n_values[metric], len(row.seeds)))
            if paper is not None:
                ref = paper.get((row.method, row.labeled_num), {}).get(metric)
                cells.append("n/a" if ref is None else f"{ref:.{digits}f}")
        cells.append(f"{row.n_nan_cases}/{row.n_cases}")
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def format_per_seed_table(
    results: Sequence[RunResult], extra_columns: Sequence[str] = (), digits: int = 2
) -> str:
    """Markdown table, one row per run, sorted by labelled count, method (paper order) and seed.

    ``extra_columns`` names keys of :attr:`RunResult.extra` shown as further columns (e.g. ``train_seconds``, headed
    "train (s)"; a float is shown rounded to a whole number).
    """
    order = list(METHOD_NAMES)
    ordered = sorted(
        results,
        key=lambda r: (r.labeled_num, order.index(r.method) if r.method in order else len(order), r.method, r.seed),
    )
    extra_headers = [key.replace("_seconds", " (s)").replace("_", " ") for key in extra_columns]
    header = ["Method", "Labelled", "Seed", *(_HEADERS[m] for m in METRICS), "NaN cases", *extra_headers]
    lines = [_md_row(header), _md_row(["---"] * 3 + ["---:"] * (len(header) - 3))]
    for r in ordered:
        cells = [METHOD_NAMES.get(r.method, r.method), str(r.labeled_num), str(r.seed)]
        cells += ["n/a" if math.isnan(r.metrics[m]) else f"{r.metrics[m]:.{digits}f}" for m in METRICS]
        cells.append(f"{r.n_nan.get('hd95', 0)}/{r.n_cases}")
        for key in extra_columns:
            value = r.extra.get(key)
            cells.append("n/a" if value is None else (f"{value:.0f}" if isinstance(value, float) else str(value)))
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PairedTest:
    """``method`` against ``reference`` on the same test cases and seeds: one pair per (seed, case).

    Attributes:
        differences: ``method - reference`` of the metric per pair (Dice in points), in (seed, case) order.
        p_value: two-sided Wilcoxon signed-rank test of the differences (NaN with fewer than two non-zero ones).
    """

    method: str
    reference: str
    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    p_value: float

    @property
    def wins(self) -> int:
        """Pairs where ``method`` is better (higher Dice/Jaccard, lower HD95/ASD)."""
        sign = 1.0 if self.metric in _PERCENT else -1.0
        return sum(1 for d in self.differences if sign * d > 0)


def case_metrics(result: RunResult, metric: str = "dice") -> dict[str, float]:
    """case -> ``metric`` of one run, read from the ``metrics.csv`` beside its ``summary.json`` (Dice and Jaccard
    in %, as in the tables; a case without a value is left out).

    Raises:
        FileNotFoundError: if there is no ``metrics.csv`` beside the summary.
    """
    import csv

    summary = Path(result.path)
    path = summary.with_name("metrics.csv")
    if not path.is_file():
        raise FileNotFoundError(f"per-case file {path} does not exist (written by test_3D_dt.py beside {summary.name})")
    units = (json.loads(summary.read_text(encoding="utf-8")).get("units") or {}) if summary.is_file() else {}
    scale = 100.0 if metric in _PERCENT and units.get(metric, "fraction") == "fraction" else 1.0
    values = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = (row.get(metric) or "").strip().lower()
            if text not in ("", "nan", "none", "null"):
                values[row["case"]] = float(text) * scale
    return values


def paired_test(method_runs: Sequence[RunResult], reference_runs: Sequence[RunResult], metric: str = "dice") -> PairedTest:
    """Pair the runs of two methods by seed and their test cases by name; Wilcoxon signed-rank test of the
    differences (``scipy.stats.wilcoxon``, two-sided).

    Raises:
        ValueError: if the two share no (seed, case) pair, or a method has two runs of one seed.
    """
    from scipy import stats

    def by_seed(runs: Sequence[RunResult]) -> dict[int, RunResult]:
        seeds = [r.seed for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"two runs of one seed among {seeds}")
        return {r.seed: r for r in runs}

    mine, theirs = by_seed(method_runs), by_seed(reference_runs)
    seeds = tuple(sorted(set(mine) & set(theirs)))
    differences = []
    for seed in seeds:
        a, b = case_metrics(mine[seed], metric), case_metrics(theirs[seed], metric)
        differences += [a[case] - b[case] for case in sorted(set(a) & set(b))]
    if not differences:
        raise ValueError("the two methods share no (seed, test case) pair")
    method, reference = method_runs[0].method, reference_runs[0].method
    nonzero = [d for d in differences if d != 0.0]
    p_value = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else math.nan
    return PairedTest(method, reference, metric, seeds, tuple(differences), p_value)


def format_paired_table(results: Sequence[RunResult], reference: str = "supervised", digits: int = 2) -> str:
    """Markdown table: every method against ``reference`` at the same labelled count and checkpoint
    (``extra["checkpoint"]``): mean ± std of the per-pair Dice difference, pairs won, the Wilcoxon p-value and the
    mean training minutes per run of the method and of the reference."""
    groups: dict[tuple[int, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.labeled_num, str(r.extra.get("checkpoint", "best-val")), r.method), []).append(r)
    order = list(METHOD_NAMES)
    header = ["Method", "vs", "Labelled", "Checkpoint", "Seeds", "Pairs", "Dice difference (points)", "Better in",
              "Wilcoxon p", "train min / run", "vs train min / run"]
    lines = [_md_row(header), _md_row(["---"] * 4 + ["---:"] * (len(header) - 4))]
    for (labeled, checkpoint, method), runs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][2]) if kv[0][2] in order else len(order),
                                            kv[0][1])):
        ref_runs = groups.get((labeled, checkpoint, reference))
        if method == reference or not ref_runs:
            continue
        test = paired_test(runs, ref_runs)
        diffs = test.differences
        spread = statistics.stdev(diffs) if len(diffs) >= 2 else math.nan
        minutes = [_train_minutes(groups.get((labeled, "best-val", m), [])) for m in (method, reference)]
        lines.append(_md_row([
            METHOD_NAMES.get(method, method), METHOD_NAMES.get(reference, reference), str(labeled), checkpoint,
            " ".join(map(str, test.seeds)), str(len(diffs)),
            _mean_std(statistics.fmean(diffs), spread, digits, 1, 1),
            f"{test.wins}/{len(diffs)}", "n/a" if math.isnan(test.p_value) else f"{test.p_value:.3g}",
            *minutes,
        ]))
    return "\n".join(lines) + "\n"


def _train_minutes(runs: Sequence[RunResult]) -> str:
    seconds = [float(r.extra["train_seconds"]) for r in runs if r.extra.get("train_seconds") is not None]
    return f"{statistics.fmean(seconds) / 60:.1f}" if seconds else "n/a"


def format_config(config: Mapping[str, Any]) -> str:
    """Markdown bullet list ``- key: value`` (lists joined by spaces), in the given order."""
    lines = []
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        lines.append(f"- {key}: `{value}`")
    return "\n".join(lines) + "\n"


def _mean_std(mean: float, std: float, digits: int, n_values: int, n_seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    if n_values != n_seeds:  # a seed without any value: say so rather than silently averaging fewer
        text += f" ({n_values}/{n_seeds} seeds)"
    return text


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="summary.json files of test_3D_dt.py -> Markdown table (mean ± std over seeds)",
    )
    parser.add_argument("summaries", nargs="+", type=Path,
                        help="summary.json files; each run is named <exp>_seed<seed>_<labelled> (the test --exp)")
    parser.add_argument("--paper", action="store_true", help="add the paper's Table 4 numbers (SPEC section 4)")
    parser.add_argument("--per_seed", action="store_true", help="also print one row per run")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs and aggregates as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Summarise; return 0, or 1 with one line on stderr when a file is missing or malformed."""
    args = build_parser().parse_args(argv)
    try:
        results = [load_summary(path) for path in args.summaries]
        rows = aggregate(results)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = format_table(rows, PAPER_TABLE4 if args.paper else None)
    if args.per_seed:
        text += "\n" + format_per_seed_table(results)
    if args.out is None:
        print(text, end="")
    else:
        atomic_write_text(args.out, text)
        print(f"table written to {args.out}", file=sys.stderr)
    if args.json is not None:
        payload = {"runs": [r.to_dict() for r in results], "aggregates": [r.to_dict() for r in rows]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
