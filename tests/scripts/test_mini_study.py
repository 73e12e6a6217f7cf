"""Tests of scripts/mini_study.py (the CPU protocols ``brats`` and ``la``) and of the paired test in
scripts/summarise_results.py.

The printed commands are parsed with the entry scripts' own parsers; the paired test is checked against the exact
Wilcoxon p-values of small samples (2 / 2^n when all n differences have one sign); each preset runs once end to end
on tiny synthetic cases (slow).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import test_3D_dt
from dataloaders.preprocess import make_splits
from make_synthetic_brats import case_name, make_case, write_case
from synthetic_h5 import write_synthetic_h5_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import mini_study  # noqa: E402
import summarise_results  # noqa: E402
from test_reproduce_scripts import (  # noqa: E402
    _check_both_checkpoints_tested,
    _commands,
    _parse_tests,
    _parse_train,
)

NAMES = [f"Brats18_CASE_{i:03d}_1" for i in range(32)]


def test_split_writer_gives_24_2_6_disjoint_seeded_lists_labelled_first(tmp_path):
    splits = mini_study.write_split_lists(NAMES, tmp_path, 24, 2, 6, seed=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 2, 6]
    every = splits["train"] + splits["val"] + splits["test"]
    assert sorted(every) == sorted(NAMES)  # disjoint and complete
    assert mini_study.seeded_split(list(reversed(NAMES)), 24, 2, 6, seed=3) == splits  # order of discovery irrelevant
    assert mini_study.seeded_split(NAMES, 24, 2, 6, seed=4) != splits
    train_lines = (tmp_path / "train.txt").read_text().splitlines()
    assert train_lines == splits["train"]
    labelled = train_lines[:4]
    # the trainer's labelled cases are the first 4 lines; preprocess_brats2019 keeps the lists already there
    data = tmp_path / "data"
    data.mkdir()
    for name in NAMES:
        (data / f"{name}.h5").touch()
    assert make_splits(NAMES, seed=999, out_dir=tmp_path)["train"][:4] == labelled


def test_split_writer_accepts_its_own_lists_and_refuses_different_ones(tmp_path):
    first = mini_study.write_split_lists(NAMES, tmp_path, 24, 2, 6, seed=1)
    assert mini_study.write_split_lists(NAMES, tmp_path, 24, 2, 6, seed=1) == first
    with pytest.raises(ValueError, match="differ from the seeded split"):
        mini_study.write_split_lists(NAMES, tmp_path, 24, 2, 6, seed=2)
    with pytest.raises(ValueError, match="exceed the 32 cases"):
        mini_study.seeded_split(NAMES, 30, 2, 6, seed=1)


def test_split_writer_uses_the_la_layouts_list_names(tmp_path):
    splits = mini_study.write_split_lists(NAMES, tmp_path, 20, 4, 8, seed=1, dataset="la")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.list", "train.list", "val.list"]
    assert (tmp_path / "val.list").read_text().split() == splits["val"]
    assert mini_study.read_split_lists(tmp_path, "la") == splits
    assert mini_study.read_split_lists(tmp_path, "brats2019") is None


def _dry_run(capsys, tmp_path: Path, *argv: str) -> list[list[str]]:
    assert mini_study.main(["--dry-run", "--work_dir", str(tmp_path / "w"), *argv]) == 0
    out = capsys.readouterr().out
    print(out)  # kept for a test that reads the comment lines
    return _commands(out)


def test_brats_preset_prints_preprocessing_and_a_run_per_method_and_seed_with_one_optimiser(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--preset", "brats", "--raw_dir", str(tmp_path / "raw"),
                    "--methods", "supervised", "ugmcl", "mcnet_plus", "bcp")
    assert cmds[0][0] == "preprocess_brats2019.py"
    assert cmds[0][cmds[0].index("--spacing") + 1] == "3"
    parsed = [_parse_train(c) for c in cmds[1:] if c[0] != "test_3D_dt.py"]
    assert all(c.count("--base_lr") == c.count("--lr_schedule") == 1 for c in cmds[1:] if c[0] != "test_3D_dt.py")
    assert sorted(m for m, _ in parsed) == ["bcp"] * 3 + ["mcnet_plus"] * 3 + ["supervised"] * 3 + ["ugmcl"] * 3
    _check_both_checkpoints_tested(_parse_tests(cmds[1:]), tmp_path / "w" / "model", "brats2019")
    for method, args in parsed:
        assert (args.dataset, args.patch_size, args.labeled_num, args.max_iterations) == (
            "brats2019", [48, 48, 48], 8, 500)
        assert (args.base_lr, args.lr_schedule, args.feature_scale, args.mc_passes) == (0.05, "poly", 8, 4)
        assert args.model == ("mcnet3d_v2" if method == "mcnet_plus" else "vnet_dt")
        assert args.consistency_rampup == 500 and args.consistency_interval == 1
        assert args.root_path == str(tmp_path / "w" / "preprocessed")
    assert {a.variant for m, a in parsed if m == "ugmcl"} == {"paper"}  # the V-Net with its own SDF head
    assert {a.bcp_pretrain_iterations for m, a in parsed if m == "bcp"} == {100}  # 0.2 of 500
    assert {a.seed for _, a in parsed} == {1, 2, 3}


def test_la_preset_trains_and_tests_on_the_resampled_la_tree(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--preset", "la", "--seeds", "7")
    assert f"# resample {mini_study.SHARED_DATA / 'la2018_samples'} (0.625 mm) to 1.875 mm" in capsys.readouterr().out
    parsed = [_parse_train(c) for c in cmds if c[0] != "test_3D_dt.py"]
    tests = [test_3D_dt.build_parser().parse_args(c[1:]) for c in cmds if c[0] == "test_3D_dt.py"]
    assert sorted(m for m, _ in parsed) == ["supervised", "ugmcl"] and len(tests) == 4
    for _, args in parsed:
        assert (args.dataset, args.patch_size, args.seed, args.model) == ("la", [48, 48, 32], 7, "vnet_dt")
        assert (args.base_lr, args.max_iterations) == (0.02, 1000)
    assert all(t.dataset == "la" and t.split == "test" and t.feature_scale == 8 for t in tests)
    assert all((t.stride_xy, t.stride_z) == (24, 16) for t in tests)


def test_an_option_given_overrides_the_presets_value(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--preset", "la", "--max_iterations", "40", "--methods", "ugmcl",
                    "--seeds", "1", "--model", "default")
    (method, args), = [_parse_train(c) for c in cmds if c[0] != "test_3D_dt.py"]
    assert (method, args.max_iterations, args.consistency_rampup) == ("ugmcl", 40, 40)
    assert args.model == "vnet_dt" and args.variant == "released"  # the LA default network, the released variant


def test_mini_study_reports_a_missing_raw_folder(tmp_path, capsys):
    assert mini_study.main(["--raw_dir", str(tmp_path / "nope"), "--work_dir", str(tmp_path / "w")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert mini_study.main(["--preset", "la", "--raw_dir", str(tmp_path), "--work_dir", str(tmp_path / "w")]) == 1
    assert "holds no case file 2018LA_Seg_Training Set/{name}/mri_norm2.h5" in capsys.readouterr().err


def _write_la_tree(raw: Path, n_cases: int, shape=(48, 40, 32)) -> list[str]:
    """A UA-MT-like LA tree of synthetic cases (``<raw>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5``)."""
    names = write_synthetic_h5_dataset(raw / "flat", n_cases, shape, seed=0)
    for name in names:
        target = raw / "2018LA_Seg_Training Set" / f"ID{name[-6:]}"
        target.mkdir(parents=True)
        (raw / "flat" / "data" / f"{name}.h5").rename(target / "mri_norm2.h5")
    (raw / "2018LA_Seg_Training Set" / "not_a_case").mkdir()  # a folder without the file is no case
    return sorted(f"ID{name[-6:]}" for name in names)


def test_la_cases_are_found_and_resampled_with_their_spacing(tmp_path):
    names = _write_la_tree(tmp_path / "raw", 3)
    assert mini_study.find_h5_cases(tmp_path / "raw", "la") == names
    root = tmp_path / "prepared"
    assert mini_study.prepare_resampled(tmp_path / "raw", root, "la", names, 0.625, 1.25) == 3
    out = root / "2018LA_Seg_Training Set" / names[0] / "mri_norm2.h5"
    with h5py.File(out, "r") as f:
        assert f["image"].shape == (24, 20, 16) and f["label"].shape == (24, 20, 16)
        assert np.allclose(f.attrs["spacing"], 1.25)
    assert mini_study.prepare_resampled(tmp_path / "raw", root, "la", names, 0.625, 1.25) == 0  # kept
    assert mini_study.prepare_resampled(tmp_path / "raw", root, "la", names, 0.625, 2.5) == 3  # other spacing


def _write_run(root: Path, name: str, dice_by_case: dict[str, float]) -> summarise_results.RunResult:
    """A test folder as test_3D_dt.py leaves it: metrics.csv (Dice as a fraction) and summary.json."""
    root.mkdir(parents=True)
    rows = "".join(f"{case},{dice},{dice},1.0,0.5\n" for case, dice in dice_by_case.items())
    (root / "metrics.csv").write_text("case,dice,jaccard,hd95,asd\n" + rows, encoding="utf-8")
    mean = float(np.mean(list(dice_by_case.values())))
    metrics = {m: {"mean": mean if m in ("dice", "jaccard") else 1.0, "n_nan": 0} for m in summarise_results.METRICS}
    summary = {"metrics": metrics, "units": {"dice": "fraction", "jaccard": "fraction"}, "n_cases": len(dice_by_case),
               "config": {"exp": name}}
    (root / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return summarise_results.load_summary(root / "summary.json", extra={"checkpoint": "best-val", "train_seconds": 120})


def test_paired_test_pairs_seeds_and_cases_and_gives_the_exact_wilcoxon_p(tmp_path):
    sup = [_write_run(tmp_path / f"s{seed}", f"BraTs2019_Supervised_seed{seed}_8",
                      {"a": 0.5, "b": 0.6, "c": 0.7}) for seed in (1, 2)]
    ug = [_write_run(tmp_path / "u1", "BraTs2019_UGMCL_seed1_8", {"a": 0.51, "b": 0.62, "c": 0.73, "x": 0.9}),
          _write_run(tmp_path / "u2", "BraTs2019_UGMCL_seed2_8", {"a": 0.54, "b": 0.65, "c": 0.7})]
    test = summarise_results.paired_test(ug, sup)
    assert test.seeds == (1, 2)
    assert np.allclose(test.differences, [1, 2, 3, 4, 5, 0])  # case x has no partner; c of seed 2 ties
    assert test.wins == 5
    assert test.p_value == pytest.approx(2 / 2**5)  # exact signed-rank test: all 5 non-zero differences positive
    table = summarise_results.format_paired_table([*sup, *ug])
    assert "| UG-MCL | Supervised only | 8 | best-val | 1 2 | 6 | 2.50 ± 1.87 | 5/6 | 0.0625 | 2.0 | 2.0 |" in table


def test_paired_test_without_a_common_case_is_an_error(tmp_path):
    a = _write_run(tmp_path / "a", "BraTs2019_UGMCL_seed1_8", {"a": 0.5})
    b = _write_run(tmp_path / "b", "BraTs2019_Supervised_seed1_8", {"b": 0.5})
    with pytest.raises(ValueError, match="share no"):
        summarise_results.paired_test([a], [b])
    assert math.isnan(summarise_results.paired_test([a], [a]).p_value)  # no non-zero difference: no test


@pytest.mark.slow  # 5 subprocesses (preprocess, 2 x train + test): 14 s on an idle 2-core machine, 40+ s when shared
def test_brats_preset_runs_end_to_end_on_synthetic_cases_and_then_skips_the_finished_runs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    for i in range(8):
        write_case(raw, case_name(i + 1), make_case((48, 48, 40), rng))
    argv = ["--raw_dir", str(raw), "--work_dir", str(tmp_path / "w"), "--methods", "supervised", "ugmcl",
            "--seeds", "1", "--max_iterations", "2", "--patch_size", "32", "32", "32", "--feature_scale", "16",
            "--mc_passes", "2", "--val_interval", "2", "--spacing", "1",
            "--n_train", "4", "--n_val", "2", "--n_test", "2", "--labeled_num", "2"]
    assert mini_study.main(argv) == 0
    report = (tmp_path / "w" / "results.md").read_text(encoding="utf-8")
    for name in ("Supervised only", "UG-MCL"):
        assert f"| {name} | 2 | 1 | best-val |" in report and f"| {name} | 2 | 1 | last |" in report
    assert "torch" in report and "total wall time" in report and "never on the test set" in report
    assert "| UG-MCL | Supervised only | 2 | best-val | 1 | 2 |" in report  # the paired test's row
    results = json.loads((tmp_path / "w" / "results.json").read_text(encoding="utf-8"))
    assert sorted((r["method"], r["checkpoint"]) for r in results["runs"]) == [
        ("supervised", "best-val"), ("supervised", "last"), ("ugmcl", "best-val"), ("ugmcl", "last")]
    for run in results["runs"]:
        assert 0.0 <= run["metrics"]["dice"] <= 100.0 and run["n_cases"] == 2
        assert not math.isnan(run["extra"]["test_seconds"])
        if run["checkpoint"] == "best-val":  # the training's time once per run
            assert not math.isnan(run["extra"]["train_seconds"])
        assert run["path"].endswith("_predictions/summary.json" if run["checkpoint"] == "best-val"
                                    else "_predictions_last/summary.json")
    assert len((tmp_path / "w" / "preprocessed" / "test.txt").read_text().split()) == 2

    capsys.readouterr()
    assert mini_study.main([*argv, "--dry-run"]) == 0  # resumable: both runs done, only skip notes remain
    out = capsys.readouterr().out
    assert out.count("# skip BraTs2019_") == 2 and "train_" not in out and "test_3D_dt.py" not in out


@pytest.mark.slow  # 2 trainings (at once) and 4 tests on tiny resampled LA cases
def test_la_preset_runs_end_to_end_on_a_synthetic_la_tree(tmp_path):
    _write_la_tree(tmp_path / "raw", 8, shape=(64, 64, 64))
    argv = ["--preset", "la", "--raw_dir", str(tmp_path / "raw"), "--work_dir", str(tmp_path / "w"),
            "--seeds", "1", "--max_iterations", "2", "--patch_size", "32", "32", "32", "--feature_scale", "16",
            "--mc_passes", "2", "--val_interval", "2", "--n_train", "4", "--n_val", "2", "--n_test", "2",
            "--labeled_num", "2", "--jobs", "2"]
    assert mini_study.main(argv) == 0
    report = (tmp_path / "w" / "results.md").read_text(encoding="utf-8")
    assert "| UG-MCL | 2 | 1 | best-val |" in report and "preset la" in report
    assert "| Supervised only | 2 | 1 | last |" in report  # both runs, trained at the same time
    summary = json.loads(next((tmp_path / "w" / "model").glob("LA_UGMCL_seed1_2/*_predictions/summary.json"))
                         .read_text(encoding="utf-8"))
    assert summary["n_cases"] == 2
