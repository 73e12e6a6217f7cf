"""The log parsing and variant names of the benchmark scripts (their tables are only as right as these)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_train_loop import iteration_times, last_loss, seconds_per_iteration  # noqa: E402
from profile_train_step import parse_variant  # noqa: E402


def test_loop_log_gives_gaps_across_midnight_and_the_last_loss(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text(
        "[23:59:58.000] config: {}\n"
        "[23:59:58.500] iteration 1 : loss 1.5, supervised_loss 1.2\n"
        "[23:59:59.100] iteration 2 : loss 1.25, supervised_loss 1.1\n"
        "[23:59:59.750] iteration 3 : loss 1e-2, supervised_loss 1.0\n"
        "[23:59:59.800] iteration 3 : val dice 0.5000 hd95 3.00\n"
        "[00:00:00.500] iteration 4 : loss 0.75, supervised_loss 0.9\n"
    )
    times = iteration_times(log)
    assert times[4] - times[3] == pytest.approx(0.75)  # 23:59:59.750 -> 00:00:00.500 the next day
    assert seconds_per_iteration(times, skip=0) == pytest.approx(0.65)  # median of the gaps 0.6, 0.65, 0.75
    assert seconds_per_iteration(times, skip=1) == pytest.approx(0.7)  # iteration 1 left out: 0.65 and 0.75
    assert last_loss(log) == 0.75
    with pytest.raises(ValueError, match="fewer than two"):
        seconds_per_iteration(times, skip=3)
    log.write_text("[00:00:00.000] config: {}\n")
    assert last_loss(log) != last_loss(log)  # NaN when no iteration was logged
    log.write_text("[10:00:00.000] iteration 7 : loss : 0.812500, loss_ce: 0.5, loss_dice: 0.25\n")
    assert last_loss(log) == 0.8125  # the released script's log line


def test_profile_variant_names() -> None:
    assert parse_variant("bf16/fast/lowmem/2") == {
        "amp": True, "fast": True, "low_memory": True, "mc_chunk": 2, "compile": False}
    assert parse_variant("fp32/plain/released/0/compile") == {
        "amp": False, "fast": False, "low_memory": False, "mc_chunk": 0, "compile": True}
    for bad in ("fp16/plain/released/0", "bf16/plain/released/x", "bf16/fast/lowmem/2/compile", "bf16/plain/other/2"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_infer_bench_with_both_allocators_prints_one_table_against_the_default_plain_path(capsys) -> None:
    import bench_infer

    args = ["--shapes", "32", "32", "32", "--patch", "32", "--stride", "16", "--sw_batch", "1", "--blends", "uniform"]
    assert bench_infer.main([*args, "--both_allocators"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 32x32x32")]
    assert [(r[1].strip(), r[4].strip()) for r in rows] == [
        ("default", "plain"), ("default", "fast"), ("kept", "plain"), ("kept", "fast")
    ]
    assert rows[0][8].strip() == "1.00x"  # the reference: default allocator, plain, uniform, one window
    assert rows[2][9].strip() == "100.000000% (0 differ)"  # kept memory alone: the plain labels, bit for bit
    with pytest.raises(SystemExit):
        bench_infer.main([*args, "--both_allocators", "--malloc"])  # the two allocator options exclude each other


def test_infer_bench_predicts_preprocessed_cases_and_names_a_bad_file(tmp_path: Path, capsys) -> None:
    import bench_infer
    import h5py
    import numpy as np

    from synthetic_h5 import write_synthetic_h5_dataset

    names = write_synthetic_h5_dataset(tmp_path, n_cases=2, shape=(40, 36, 33), seed=0, n_val=0, n_test=0)
    cases = [str(tmp_path / "data" / f"{name}.h5") for name in names]
    with h5py.File(cases[0], "r") as h5:
        assert np.array_equal(bench_infer.read_h5_image(cases[0]), h5["image"][()])
    args = ["--patch", "32", "--stride", "16", "--sw_batch", "1", "--blends", "uniform"]
    assert bench_infer.main([*args, "--h5", *cases]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| BraTS19_SYN")]
    assert [(r[0].strip(), r[3].strip()) for r in rows] == [
        (f"{names[0]} 40x36x33", "plain"), (f"{names[0]} 40x36x33", "fast"),
        (f"{names[1]} 40x36x33", "plain"), (f"{names[1]} 40x36x33", "fast"),
    ]
    assert rows[0][8].strip() == "100.000000% (0 differ)"
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h5:
        h5["label"] = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(SystemExit) as stop:
        bench_infer.main([*args, "--h5", cases[0], str(bad)])
    assert stop.value.code == 2
    assert f"error: {bad}: not a preprocessed case with an 'image' dataset" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("script", ["bench_train", "bench_train_loop", "bench_infer", "profile_train_step"])
def test_a_missing_cuda_device_is_a_usage_error_not_a_traceback(script, capsys, monkeypatch):
    import importlib

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and not any("Traceback" in line for line in err)  # usage, then one error
    assert err[-1].endswith("error: device 'cuda' requested but CUDA is not available on this machine; use --device cpu")
