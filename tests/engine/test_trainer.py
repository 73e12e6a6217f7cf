"""The shared training loop: outputs, exact resume, learning, and the bad-input messages."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import TrainConfig
from engine.trainer import TrainingError, train
from synthetic_h5 import tiny_config, write_synthetic_h5_dataset

CODE = Path(__file__).resolve().parents[2] / "code"


def test_a_short_run_writes_every_output(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root)
    summary = train(cfg, model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    assert Path(summary["out_dir"]) == out
    assert (out / "log.txt").read_text().count("iteration ") >= 4
    assert "chosen: glibc keeps freed memory during the teacher's passes" in (out / "log.txt").read_text()  # CPU
    assert json.loads((out / "config.json").read_text())["max_iterations"] == 4
    assert list((out / "log").glob("events.out.tfevents.*"))
    best = torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values())  # a plain state_dict, the published format
    last = torch.load(out / "unet_3D_dt_last_model.pth", weights_only=True)
    final = torch.load(out / "checkpoint_latest.pth", weights_only=True)["student"]
    assert all(torch.equal(last[k], final[k]) for k in final)  # the final weights, beside the best ones
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    assert latest["iteration"] == 4
    assert {"student", "method", "optimizer", "rng", "config", "best"} <= set(latest)
    assert "teacher" in latest["method"]
    assert not list(out.glob("*.part*"))  # atomic writes leave no temporaries


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root, max_iterations=4, val_interval=100, save_interval=100)
    train(cfg, model_dir=tmp_path / "a", progress=False)
    train(cfg, model_dir=tmp_path / "b", progress=False, stop_after=2)
    half = torch.load(tmp_path / "b" / "tiny_2" / "unet_3D_dt" / "checkpoint_latest.pth", weights_only=True)
    assert half["iteration"] == 2
    train(replace(cfg, resume=True), model_dir=tmp_path / "b", progress=False)

    def weights(run: str) -> dict:
        state = torch.load(tmp_path / run / "tiny_2" / "unet_3D_dt" / "checkpoint_latest.pth", weights_only=True)
        return {**state["student"], **{f"t.{k}": v for k, v in state["method"]["teacher"].items()}}

    a, b = weights("a"), weights("b")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the halves really differ from the start (the comparison can fail)
    assert any(not torch.equal(a[k], half["student"][k]) for k in half["student"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_size": (32, 40, 32)}, "multiples of 16"),
        ({"batch_size": 2, "labeled_bs": 2}, "must be larger than --labeled_bs"),
        ({"stride_xy": 48}, "leave gaps between the sliding windows"),
        ({"base_lr": -0.01}, r"--base_lr must be in \(0, inf\), got -0.01"),
        ({"val_interval": 0}, r"--val_interval must be in \[1, inf\), got 0"),
        ({"num_workers": -1}, r"--num_workers must be in \[0, inf\), got -1"),
        ({"momentum": 1.0}, r"--momentum must be in \[0, 1\), got 1.0"),
        ({"ema_decay": float("nan")}, r"--ema_decay must be in \[0, 1\], got nan"),
        ({"labeled_num": 50}, "larger than the training list"),
        ({"root_path": "/nonexistent/BraTS"}, "make demo"),
    ],
)
def test_bad_options_give_one_line_errors(tiny_root: Path, tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        train(tiny_config(tiny_root, **overrides), model_dir=tmp_path, progress=False)


def test_missing_split_list_says_how_to_prepare_data(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(TrainingError, match=r"train\.txt not found.*preprocess_brats2019"):
        train(tiny_config(tmp_path), model_dir=tmp_path, progress=False)


def test_non_finite_loss_stops_and_names_the_iteration(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root, base_lr=1e12, max_iterations=30, val_interval=1000, save_interval=1)
    with pytest.raises(TrainingError, match=r"non-finite (loss|weights) .*iteration \d+"):
        train(cfg, model_dir=tmp_path, progress=False)
    latest = torch.load(tmp_path / "tiny_2" / "unet_3D_dt" / "checkpoint_latest.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in latest["student"].values() if v.is_floating_point())


def test_cli_exits_non_zero_with_the_message(tiny_root: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "train_UGMCL_3D.py", "--root_path", str(tiny_root), "--model_dir", str(tmp_path),
           "--labeled_num", "99", "--device", "cpu", "--num_workers", "0"]
    result = subprocess.run(cmd, cwd=CODE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: --labeled_num 99 is larger than the training list" in result.stderr


def test_supervised_part_of_the_loss_falls_when_overfitting_two_tiny_cases(tmp_path: Path) -> None:
    """Two tiny cases, all labelled, 40 SGD steps: the network must fit them (the loss clearly falls)."""
    from methods import UGMCL
    from methods.base import Batch
    from networks.net_factory_3d import net_factory_3d

    root = tmp_path / "two"
    write_synthetic_h5_dataset(root, n_cases=3, shape=(32, 32, 32), seed=5, n_val=0, n_test=1)
    from dataloaders.brats2019 import BraTS2019

    cases = [BraTS2019(str(root), split="train")[i] for i in range(2)]
    image = torch.stack([torch.as_tensor(c["image"], dtype=torch.float32)[None] for c in cases])
    label = torch.stack([torch.as_tensor(c["label"]).long() for c in cases])
    batch = Batch(image, label, labeled_bs=2)

    torch.manual_seed(0)
    net = net_factory_3d("unet_3D_dt", in_chns=1, class_num=2, feature_scale=16)
    method = UGMCL(net, tiny_config(root, mc_passes=2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    supervised = []
    for step in range(40):
        loss, logs = method.training_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        supervised.append(logs["supervised_loss"])
    first, last = sum(supervised[:3]) / 3, sum(supervised[-3:]) / 3
    assert last < 0.6 * first, (first, last)


def test_defaults_follow_the_patch_and_the_method_and_the_log_says_so(tiny_root: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(CODE))
    from train_UGMCL_3D import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--patch_size", "32", "32", "48"]))
    assert (cfg.stride_xy, cfg.stride_z, cfg.model) == (21, 32, "unet_3D_dt")  # two thirds of 32 and of 48
    published = config_from_args(build_parser().parse_args([]))
    assert (published.stride_xy, published.stride_z) == (64, 64)  # the released 96 -> 64
    assert config_from_args(build_parser().parse_args(["--stride_xy", "8"])).stride_xy == 8  # given: kept
    assert config_from_args(build_parser().parse_args(["--method", "dtc"])).model == "vnet_dt"
    assert config_from_args(build_parser().parse_args(["--method", "urpc"])).model == "unet_3D_ds"
    assert config_from_args(build_parser().parse_args(["--variant", "paper"])).model == "vnet_dt"
    assert config_from_args(build_parser().parse_args(["--method", "dtc", "--model", "vnet"])).model == "vnet"
    cfg = replace(tiny_config(tiny_root, max_iterations=1, method="urpc"), model=None, stride_xy=None)
    cfg = TrainConfig(**{**cfg.to_dict(), "model": None, "stride_xy": None, "stride_z": None})
    summary = train(cfg, model_dir=tmp_path, progress=False)
    log = (Path(summary["out_dir"]) / "log.txt").read_text()
    assert Path(summary["out_dir"]).name == "unet_3D_ds"
    assert "chosen: --model unet_3D_ds (the network --method urpc needs on brats2019)" in log
    assert "chosen: --stride_xy 21 (two thirds of the patch)" in log


def test_feature_scale_narrows_a_vnet_and_the_checkpoint_tests_at_that_width(tiny_root: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(CODE))
    import test_3D_dt

    cfg = tiny_config(tiny_root, model="vnet_dt", feature_scale=16, max_iterations=1, val_interval=1)
    summary = train(cfg, model_dir=tmp_path, progress=False)
    weights = Path(summary["out_dir"]) / "vnet_dt_best_model.pth"
    state = torch.load(weights, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    first = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 5)
    assert first.shape[0] == 4  # 64 // 16 first-stage filters instead of the published 16
    args = ["--root_path", str(tiny_root), "--model", "vnet_dt", "--checkpoint", str(weights), "--feature_scale", "16",
            "--patch_size", "32", "32", "32", "--stride_xy", "16", "--stride_z", "16", "--out_dir",
            str(tmp_path / "test"), "--no_save", "--no_progress", "--device", "cpu"]
    assert test_3D_dt.main(args) == 0
    assert json.loads((tmp_path / "test" / "summary.json").read_text())["n_cases"] >= 1


def test_resume_with_options_that_do_not_fit_the_checkpoint_names_them_and_writes_nothing(
    tiny_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_root, max_iterations=2, val_interval=2, save_interval=2)
    train(cfg, model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match=r"--feature_scale 8 \(checkpoint: 16\)") as err:
        train(replace(cfg, resume=True, feature_scale=8, max_iterations=4), model_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.json, log.txt untouched


@pytest.mark.parametrize("problem", ["random_bytes", "no_label", "missing_val_case", "overlap"])
def test_bad_listed_case_files_stop_before_anything_is_written(tmp_path: Path, problem: str) -> None:
    root = tmp_path / "data_root"
    write_synthetic_h5_dataset(root, n_cases=7, shape=(36, 36, 34), seed=3, n_val=1, n_test=1)
    train_cases = (root / "train.txt").read_text().split()
    victim = root / "data" / f"{train_cases[-1]}.h5"
    if problem == "random_bytes":
        victim.write_bytes(np.random.default_rng(0).bytes(4096))
        expected = rf"{victim.name}.*(not a readable HDF5|HDF5)"
    elif problem == "no_label":  # a labelled case (the first --labeled_num of train.txt) without its label
        import h5py

        victim = root / "data" / f"{train_cases[0]}.h5"
        with h5py.File(victim, "a") as f:
            del f["label"]
        expected = rf"{victim.name}.*label"
    elif problem == "missing_val_case":
        (root / "val.txt").write_text("not_there\n")
        expected = "not_there"
    else:
        (root / "val.txt").write_text(train_cases[0] + "\n")
        expected = rf"{train_cases[0]}.*train.*val"
    with pytest.raises(TrainingError, match=expected) as err:
        train(tiny_config(root, max_iterations=2), model_dir=tmp_path / "model", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "model").exists()  # checked before the run folder, config.json or log.txt


def test_unlabelled_cases_need_no_label_and_none_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    root = tmp_path / "data_root"
    write_synthetic_h5_dataset(root, n_cases=7, shape=(36, 36, 34), seed=3, n_val=1, n_test=1)
    train_cases = (root / "train.txt").read_text().split()
    extra = train_cases.pop()  # moved to unlabeled.txt, without its label
    (root / "train.txt").write_text("\n".join(train_cases) + "\n")
    (root / "unlabeled.txt").write_text(extra + "\n")
    for name in [*train_cases[2:], extra]:  # every unlabelled case loses its label
        with h5py.File(root / "data" / f"{name}.h5", "a") as f:
            del f["label"]
    import engine.batches as batches

    seen_labels = []
    real = batches.Batch

    def spy(image, label, labeled_bs):
        seen_labels.append(label[labeled_bs:])
        return real(image, label, labeled_bs)

    monkeypatch.setattr(batches, "Batch", spy)
    summary = train(tiny_config(root, max_iterations=3, val_interval=3), model_dir=tmp_path / "m", progress=False)
    assert summary["iterations"] == 3
    assert seen_labels and all(bool((rows == batches.UNLABELLED).all()) for rows in seen_labels)


def test_four_modalities_train_with_the_channels_read_from_the_data(tmp_path: Path) -> None:
    root = tmp_path / "four"
    write_synthetic_h5_dataset(root, n_cases=6, shape=(36, 36, 34), seed=4, n_val=1, n_test=1, channels=4)
    summary = train(tiny_config(root, max_iterations=2, val_interval=2), model_dir=tmp_path / "m", progress=False)
    out = Path(summary["out_dir"])
    assert json.loads((out / "config.json").read_text())["in_channels"] == 4
    assert "chosen: --in_channels 4" in (out / "log.txt").read_text()
    weights = torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True)
    assert weights["conv1.conv1.0.weight"].shape[1] == 4
    with pytest.raises(TrainingError, match=r"--in_channels 1 does not fit the data: .* 4 channel"):
        train(tiny_config(root, in_channels=1), model_dir=tmp_path / "m1", progress=False)


def test_a_method_with_two_stages_gets_the_first_stages_model_saved(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from methods.supervised import Supervised

    monkeypatch.setattr(Supervised, "stage", lambda self, step: "pretrain" if step < 2 else "selftrain")
    summary = train(tiny_config(tiny_root, method="supervised", max_iterations=3, val_interval=3, save_interval=1),
                    model_dir=tmp_path, progress=False)
    out = Path(summary["out_dir"])
    pretrain = torch.load(out / "unet_3D_dt_pretrain_model.pth", weights_only=True)
    assert "saved the pretrain stage's model at iteration 2" in (out / "log.txt").read_text()
    assert not (out / "unet_3D_dt_selftrain_model.pth").exists()  # the last stage: the last model
    last = torch.load(out / "unet_3D_dt_last_model.pth", weights_only=True)
    assert any(not torch.equal(pretrain[k], last[k]) for k in last)  # saved after iteration 2, not 3


def test_a_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_root: Path, tmp_path: Path) -> None:
    import os
    import signal
    import time

    args = ["--root_path", str(tiny_root), "--exp", "tiny", "--labeled_num", "2", "--patch_size", "32", "32", "32",
            "--feature_scale", "16", "--max_iterations", "10", "--batch_size", "2", "--labeled_bs", "1",
            "--mc_passes", "2", "--val_interval", "100", "--save_interval", "1", "--num_workers", "0",
            "--device", "cpu", "--stride_xy", "16", "--stride_z", "16", "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([sys.executable, "train_UGMCL_3D.py", *args, "--model_dir", str(tmp_path / "whole")],
                           cwd=CODE, env=env, capture_output=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-500:]
    latest = tmp_path / "killed" / "tiny_2" / "unet_3D_dt" / "checkpoint_latest.pth"
    proc = subprocess.Popen([sys.executable, "train_UGMCL_3D.py", *args, "--model_dir", str(tmp_path / "killed")],
                            cwd=CODE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and torch.load(latest, weights_only=True)["iteration"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stopped_at = torch.load(latest, weights_only=True)["iteration"]
    assert 2 <= stopped_at < 10  # killed mid-run, after a checkpoint
    resumed = subprocess.run([sys.executable, "train_UGMCL_3D.py", *args, "--model_dir", str(tmp_path / "killed"),
                              "--resume"], cwd=CODE, env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-500:]
    a = torch.load(tmp_path / "whole" / "tiny_2" / "unet_3D_dt" / "unet_3D_dt_last_model.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "tiny_2" / "unet_3D_dt" / "unet_3D_dt_last_model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
