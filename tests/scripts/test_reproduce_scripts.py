"""Tests of scripts/reproduce_brats2019.py (BraTS2019 and ``--dataset la``), scripts/reproduce_la.sh,
scripts/summarise_results.py.

The printed commands are checked by parsing them with the entry scripts' own parsers (so they are runnable), the
table against hand-computed means and sample standard deviations (the mini-study: tests/scripts/test_mini_study.py).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_3D_dt
import train_UGMCL_3D

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS_DIR))

import reproduce_brats2019  # noqa: E402
import summarise_results  # noqa: E402

SCRIPT_METHOD = {script: method for method, script in reproduce_brats2019.ENTRY_SCRIPTS.items()}


def _commands(text: str) -> list[list[str]]:
    """The non-comment lines, split like a shell; the interpreter is dropped."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line)[1:] for line in lines]


def _parse_train(cmd: list[str]):
    method = SCRIPT_METHOD[cmd[0]]
    return method, train_UGMCL_3D.build_parser(method=method).parse_args(cmd[1:])


def _dry_run(capsys, tmp_path: Path, *extra: str) -> list[list[str]]:
    code = reproduce_brats2019.main(
        ["--dry-run", "--root_path", str(tmp_path / "data"), "--model_dir", str(tmp_path / "model"), *extra]
    )
    assert code == 0
    return _commands(capsys.readouterr().out)


def _parse_tests(cmds: list[list[str]]) -> dict[str, dict[str, object]]:
    """Test commands by run (their --exp): checkpoint kind ("best-val" / "last") -> parsed options."""
    by_run: dict[str, dict[str, object]] = {}
    for cmd in cmds:
        if cmd[0] != "test_3D_dt.py":
            continue
        args = test_3D_dt.build_parser().parse_args(cmd[1:])
        name = Path(args.checkpoint).name
        kind = {f"{args.model}_best_model.pth": "best-val", f"{args.model}_last_model.pth": "last",
                "checkpoint_latest.pth": "last"}[name]
        assert kind not in by_run.setdefault(args.exp, {}), f"{args.exp} tested twice on {kind}"
        by_run[args.exp][kind] = args
    return by_run


def _check_both_checkpoints_tested(by_run, model_dir: Path, dataset: str) -> None:
    """Every run: one best-val and one last test, each on its own weights file and into its own folder."""
    for exp, tests in by_run.items():
        assert sorted(tests) == ["best-val", "last"], exp
        best, last = tests["best-val"], tests["last"]
        for args in (best, last):
            assert (args.dataset, args.split, args.model_dir) == (dataset, "test", str(model_dir))
            assert Path(args.checkpoint).parent == model_dir / exp / args.model  # the run's training folder
        assert Path(best.out_dir) == model_dir / exp / f"{best.model}_predictions"  # as before
        assert Path(last.out_dir) == model_dir / exp / f"{last.model}_predictions_last"


def test_reproduce_dry_run_trains_and_tests_every_method_labelled_count_and_seed(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path)
    trains = [c for c in cmds if c[0] != "test_3D_dt.py"]
    tests = [c for c in cmds if c[0] == "test_3D_dt.py"]
    assert len(trains) == len(reproduce_brats2019.TABLE4_METHODS) * 2 * 3 == 9 * 2 * 3  # Table 4's seven, MC-Net+, BCP
    assert len(tests) == 2 * len(trains)  # best-val and last of every run

    seen, folders = set(), []
    for cmd in trains:
        method, args = _parse_train(cmd)
        seen.add((method, args.labeled_num, args.seed))
        folders.append(f"{args.exp}_{args.labeled_num}")
        assert args.max_iterations == 30000
        assert str(args.seed) in args.exp  # one folder per seed
        if method == "ugmcl":
            assert (args.base_lr, args.lr_schedule) == (0.01, "constant")
        else:
            assert (args.base_lr, args.lr_schedule) == (0.1, "poly")
        assert args.model == {"dtc": "vnet_dt", "urpc": "unet_3D_ds", "mcnet_plus": "mcnet3d_v2"}.get(method, "unet_3D_dt")
        assert args.model_dir == str(tmp_path / "model")
    expected = {(m, n, s) for m in reproduce_brats2019.ENTRY_SCRIPTS for n in (25, 50) for s in (1337, 1338, 1339)}
    assert seen == expected
    assert len(set(folders)) == len(folders)

    by_run = _parse_tests(tests)
    assert sorted(by_run) == sorted(folders)  # each run tested in its own training folder
    _check_both_checkpoints_tested(by_run, tmp_path / "model", "brats2019")


def test_reproduce_dry_run_applies_baseline_lr_options_but_keeps_ugmcl_released_rate(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--methods", "uamt", "ugmcl", "--labeled_nums", "25", "--seeds", "7",
                    "--baseline_lr", "0.05", "--no-baseline_poly", "--max_iterations", "100", "--amp")
    parsed = dict(_parse_train(c) for c in cmds if c[0] != "test_3D_dt.py")
    assert (parsed["uamt"].base_lr, parsed["uamt"].lr_schedule) == (0.05, "constant")
    assert (parsed["ugmcl"].base_lr, parsed["ugmcl"].lr_schedule) == (0.01, "constant")
    assert all(args.max_iterations == 100 and args.amp for args in parsed.values())


def _touch_summary(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text("{}")


def test_reproduce_dry_run_skips_tested_runs_tests_trained_ones_and_resumes_interrupted_ones(capsys, tmp_path):
    model = tmp_path / "model"
    run = "BraTs2019_UGMCL_seed{}_25".format
    # seed 1: tested on best-val before last models existed, its weights since removed: skipped, never retrained
    _touch_summary(model / run(1) / "unet_3D_dt_predictions")
    # seed 2: trained before <model>_last_model.pth was saved: both tested, last from the final checkpoint
    trained = model / run(2) / "unet_3D_dt"
    trained.mkdir(parents=True)
    torch.save({"iteration": 500}, trained / "checkpoint_latest.pth")
    torch.save({}, trained / "unet_3D_dt_best_model.pth")
    interrupted = model / run(3) / "unet_3D_dt"
    interrupted.mkdir(parents=True)
    torch.save({"iteration": 200}, interrupted / "checkpoint_latest.pth")
    # seed 5: trained and tested on best-val only: tested on last only
    five = model / run(5) / "unet_3D_dt"
    five.mkdir(parents=True)
    torch.save({"iteration": 500}, five / "checkpoint_latest.pth")
    torch.save({}, five / "unet_3D_dt_best_model.pth")
    torch.save({}, five / "unet_3D_dt_last_model.pth")
    _touch_summary(model / run(5) / "unet_3D_dt_predictions")
    # seed 6: tested on both: skipped
    _touch_summary(model / run(6) / "unet_3D_dt_predictions")
    _touch_summary(model / run(6) / "unet_3D_dt_predictions_last")

    cmds = _dry_run(capsys, tmp_path, "--methods", "ugmcl", "--labeled_nums", "25",
                    "--seeds", "1", "2", "3", "4", "5", "6", "--max_iterations", "500", "--resume")
    trains = {_parse_train(c)[1].seed: _parse_train(c)[1] for c in cmds if c[0] != "test_3D_dt.py"}
    tests = _parse_tests(cmds)
    assert sorted(trains) == [3, 4]
    assert trains[3].resume and not trains[4].resume
    assert sorted(tests) == [run(2), run(3), run(4), run(5)]
    assert {exp: sorted(kinds) for exp, kinds in tests.items()} == {
        run(2): ["best-val", "last"], run(3): ["best-val", "last"], run(4): ["best-val", "last"], run(5): ["last"]}
    assert Path(tests[run(2)]["last"].checkpoint) == trained / "checkpoint_latest.pth"
    assert Path(tests[run(5)]["last"].checkpoint) == five / "unet_3D_dt_last_model.pth"
    assert Path(tests[run(4)]["last"].checkpoint).name == "unet_3D_dt_last_model.pth"  # written by its training
    assert Path(tests[run(5)]["last"].out_dir) == model / run(5) / "unet_3D_dt_predictions_last"


# on LA every method trains a V-Net (vnet_dt; BCP its plain vnet, MC-Net+ its three-decoder one) but URPC
LA_MODELS = {"urpc": "unet_3D_ds", "mcnet_plus": "mcnet3d_v2", "bcp": "vnet"}


def _check_la_plan(cmds: list[list[str]], model_dir: Path, seeds: tuple[int, ...]) -> None:
    """The LA protocol: every method x (16, 8) x seed trained with --dataset la, and tested on best-val and last."""
    trains = [c for c in cmds if c[0] != "test_3D_dt.py"]
    seen, folders = set(), []
    for cmd in trains:
        method, args = _parse_train(cmd)
        seen.add((method, args.labeled_num, args.seed))
        folders.append(f"{args.exp}_{args.labeled_num}")
        assert args.dataset == "la" and args.exp.startswith("LA_") and args.model_dir == str(model_dir)
        cfg = train_UGMCL_3D.config_from_args(args, method)  # what the training will run
        assert cfg.model == LA_MODELS.get(method, "vnet_dt")
        assert (cfg.patch_size, cfg.max_iterations, cfg.base_lr, cfg.lr_schedule) == ((112, 112, 80), 6000, 0.01, "step")
    assert seen == {(m, n, s) for m in reproduce_brats2019.ENTRY_SCRIPTS for n in (16, 8) for s in seeds}
    assert len(trains) == len(seen) == len(set(folders))  # one training and one folder per run
    by_run = _parse_tests(cmds)
    assert sorted(by_run) == sorted(folders)
    _check_both_checkpoints_tested(by_run, model_dir, "la")


def test_reproduce_la_dry_run_of_the_python_entry(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--dataset", "la", "--seeds", "1", "2")
    _check_la_plan(cmds, tmp_path / "model", (1, 2))


def test_reproduce_la_sh_dry_run_prints_every_method_labelled_count_and_seed(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(SCRIPTS_DIR / "reproduce_la.sh"), "--dry-run", "--root_path", str(tmp_path / "LA"),
         "--model_dir", str(tmp_path / "model")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    _check_la_plan(cmds, tmp_path / "model", (1337, 1338, 1339))  # 3 seeds by default
    assert all(c[c.index("--root_path") + 1] == str(tmp_path / "LA") for c in cmds)


def _result(method: str, labeled: int, seed: int, dice: float, checkpoint: str) -> summarise_results.RunResult:
    metrics = {"dice": dice, "jaccard": dice - 10, "hd95": 5.0, "asd": 1.0}
    return summarise_results.RunResult(method, labeled, seed, metrics, 20, {m: 0 for m in metrics},
                                       extra={"checkpoint": checkpoint})


def _table_rows(text: str) -> tuple[list[str], dict[tuple[str, str, str], list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {(c[0], c[1], c[3]): c for c in cells[2:]}


def test_results_table_gives_the_paper_la_numbers_in_their_rows_and_marks_best_val_and_last():
    results = [_result(m, n, seed, 80.0 + seed + (1 if ckpt == "last" else 0), ckpt)
               for m in ("ugmcl", "supervised", "uamt", "dtc", "mean_teacher") for n in (16, 8) for seed in (1, 2, 3)
               for ckpt in ("last", "best-val")]
    header, rows = _table_rows(reproduce_brats2019.format_results_table(results, reproduce_brats2019.PAPER_LA))
    assert header[:4] == ["Method", "Labelled", "Seeds", "Checkpoint"]
    assert "paper Dice %" in header and not any(h.startswith("paper") and "Dice" not in h for h in header)
    paper = header.index("paper Dice %")
    expected = {"UG-MCL": "90.16", "Supervised only": "86.03", "UA-MT": "88.88", "DTC": "89.42", "Mean Teacher": "-"}
    for name, value in expected.items():
        for ckpt in ("best-val", "last"):
            assert rows[(name, "16", ckpt)][paper] == value
            assert rows[(name, "8", ckpt)][paper] == "-"  # no 8-labelled number is given: none invented
    assert len(rows) == 5 * 2 * 2
    # dice 81, 82, 83 (best-val) and 82, 83, 84 (last): mean 82 / 83, sample std 1
    assert rows[("UG-MCL", "16", "best-val")][header.index("Dice %")] == "82.00 ± 1.00"
    assert rows[("UG-MCL", "16", "last")][header.index("Dice %")] == "83.00 ± 1.00"
    # sorted by labelled count, then paper order, best-val before last
    assert list(rows)[:4] == [("Supervised only", "8", "best-val"), ("Supervised only", "8", "last"),
                              ("Mean Teacher", "8", "best-val"), ("Mean Teacher", "8", "last")]
    assert list(rows)[-2:] == [("UG-MCL", "16", "best-val"), ("UG-MCL", "16", "last")]


def test_known_experiment_names_match_the_entry_scripts():
    for method in reproduce_brats2019.ENTRY_SCRIPTS:
        exp, _ = reproduce_brats2019.entry_defaults(method)
        assert summarise_results.parse_run_name(f"{exp}_seed5_25") == (method, 25, 5)
        la_exp, _ = reproduce_brats2019.entry_defaults(method, "la")
        assert la_exp == "LA_" + exp[len("BraTs2019_"):]  # the LA runs never share a folder with the BraTS ones


def _summary(path: Path, exp: str, dice, jaccard, hd95, asd, n_nan_hd95: int = 0, n_cases: int = 6) -> Path:
    def entry(v, n_nan=0):
        return {"mean": v, "std": 0.0, "n_nan": n_nan}

    data = {
        "n_cases": n_cases,
        "metrics": {"dice": entry(dice), "jaccard": entry(jaccard), "hd95": entry(hd95, n_nan_hd95),
                    "asd": entry(asd, n_nan_hd95), "assd": entry(asd)},
        "units": {"dice": "fraction", "jaccard": "fraction", "hd95": "mm", "asd": "mm", "assd": "mm"},
        "config": {"exp": exp},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_summary_table_gives_mean_and_sample_std_over_seeds(tmp_path, capsys):
    files = [
        _summary(tmp_path / "a.json", "BraTs2019_UGMCL_seed1_25", 0.80, 0.70, 10.0, 2.0),
        _summary(tmp_path / "b.json", "BraTs2019_UGMCL_seed2_25", 0.82, 0.70, 12.0, 3.0),
        _summary(tmp_path / "c.json", "BraTs2019_UGMCL_seed3_25", 0.84, 0.73, None, 4.0, n_nan_hd95=6),
        # no config: named by the folder above the predictions folder
        tmp_path / "BraTs2019_Mean_Teacher_seed1_50" / "unet_3D_dt_predictions" / "summary.json",
    ]
    _summary(files[3], "", 0.5, 0.4, 20.0, 5.0)
    out = tmp_path / "table.md"
    assert summarise_results.main([*map(str, files), "--paper", "--per_seed", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    ugmcl = next(line for line in lines if line.startswith("| UG-MCL | 25 | 3 |"))
    # dice 80, 82, 84: mean 82, sample std sqrt((4 + 0 + 4) / 2) = 2; jaccard 70, 70, 73: sqrt((1 + 1 + 4) / 2)
    # hd95 10, 12 (third seed has none): 11 +- sqrt(2); asd 2, 3, 4: 3 +- 1; paper values of SPEC section 4
    cells = [c.strip() for c in ugmcl.strip("|").split("|")]
    assert cells[3:] == ["82.00 ± 2.00", "82.82", "71.00 ± 1.73", "72.77", "11.00 ± 1.41 (2/3 seeds)", "11.29",
                         "3.00 ± 1.00", "2.30", "6/18"]
    mt = next(line for line in lines if line.startswith("| Mean Teacher | 50 | 1 |"))
    assert [c.strip() for c in mt.strip("|").split("|")][3:5] == ["50.00", "n/a"]  # one seed: no std; no paper value
    assert "| UG-MCL | 25 | 3 | 84.00 | 73.00 | n/a | 4.00 | 6/6 |" in lines  # per-seed row of seed 3


def test_summary_of_a_missing_file_or_unnamed_run_is_a_one_line_error(tmp_path, capsys):
    assert summarise_results.main([str(tmp_path / "none.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = _summary(tmp_path / "x" / "y" / "summary.json", "my_run", 0.5, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="<exp>_seed<seed>_<labelled>"):
        summarise_results.load_summary(bad)
    assert summarise_results.load_summary(bad, "ugmcl", 25, 1).metrics["dice"] == pytest.approx(50.0)


def test_aggregate_rejects_the_same_run_twice(tmp_path):
    path = _summary(tmp_path / "a.json", "BraTs2019_UGMCL_seed1_25", 0.8, 0.7, 10.0, 2.0)
    result = summarise_results.load_summary(path)
    with pytest.raises(ValueError, match="given twice"):
        summarise_results.aggregate([result, result])


def test_report_collects_both_checkpoints_of_each_run_and_says_which_is_which(tmp_path):
    model = tmp_path / "model"
    settings = reproduce_brats2019.RunSettings(root_path=tmp_path / "LA", model_dir=model, dataset="la")
    runs = reproduce_brats2019.make_runs(["ugmcl", "supervised"], [16], [1, 2], dataset="la")
    for i, run in enumerate(runs):
        _summary(run.summary_path(model, "best-val"), run.name, 0.80 + i / 100, 0.7, 5.0, 1.0)
        _summary(run.summary_path(model, "last"), run.name, 0.70 + i / 100, 0.6, 6.0, 1.5)
        (run.folder(model) / "times.json").write_text(json.dumps(
            {"train_seconds": 100.0, "test_seconds": 10.0, "test_last_seconds": 12.0}))
    results = reproduce_brats2019.collect_results(runs, settings)
    assert len(results) == 8
    assert [reproduce_brats2019.checkpoint_of(r) for r in results] == ["best-val", "last"] * 4
    assert sum(r.extra.get("train_seconds", 0.0) for r in results) == 4 * 100.0  # one training per run
    assert sorted(r.extra["test_seconds"] for r in results) == [10.0] * 4 + [12.0] * 4

    out = tmp_path / "la.md"
    protocol = reproduce_brats2019.PROTOCOLS["la"]
    reproduce_brats2019.write_report(out, protocol.title, results, {"dataset": "la"}, paper=protocol.paper,
                                     paper_note=protocol.paper_note)
    text = out.read_text(encoding="utf-8")
    assert "picked on the validation list, never on the test set" in text and "90.16" in text
    header, rows = _table_rows(text.split("## Per seed")[0])
    dice, paper = header.index("Dice %"), header.index("paper Dice %")
    assert rows[("UG-MCL", "16", "best-val")][dice] == "80.50 ± 0.71"  # seeds 1, 2: 80 and 81
    assert rows[("UG-MCL", "16", "last")][dice] == "70.50 ± 0.71"
    assert rows[("UG-MCL", "16", "last")][paper] == rows[("UG-MCL", "16", "best-val")][paper] == "90.16"
    assert rows[("Supervised only", "16", "best-val")][paper] == "86.03"
    payload = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert sorted((a["method"], a["checkpoint"]) for a in payload["aggregates"]) == [
        ("supervised", "best-val"), ("supervised", "last"), ("ugmcl", "best-val"), ("ugmcl", "last")]
    assert "| UG-MCL | 16 | 1 |" in text.split("## Per seed")[1]  # per-seed rows, checkpoint as a column
    assert text.split("## Per seed")[1].count("| best-val |") == 4
