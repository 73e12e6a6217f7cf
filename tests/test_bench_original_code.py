"""``bench/run_original_code.py`` and the ``original`` setting of ``bench/bench_train_loop.py`` (issue #7).

The released script itself is not part of this repository, so a stand-in written here plays it: it does what the
released ``train_UGMCL_3D.py`` relies on (``.cuda()`` calls, ``torchvision`` imports, its data set and log layout)
and records what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_train_loop  # noqa: E402
from run_original_code import _compose, _make_grid, main  # noqa: E402

from synthetic_h5 import write_synthetic_h5_dataset  # noqa: E402

# Plays the released training script: .cuda() everywhere, torchvision's two names, the released data set and log.
FAKE_RELEASED_SCRIPT = '''
import argparse, json, logging, os
import torch
from torchvision import transforms
from torchvision.utils import make_grid

parser = argparse.ArgumentParser()
parser.add_argument("--root_path")
parser.add_argument("--exp")
parser.add_argument("--max_iterations", type=int)
parser.add_argument("--labeled_num", type=int, default=50)
args = parser.parse_args()
net = torch.nn.Conv3d(1, 2, 3).cuda()
x = torch.ones(1, 1, 4, 4, 4).cuda()
compose = transforms.Compose([lambda s: s + 1, lambda s: 2 * s])
lines = open(os.path.join(args.root_path, "train.txt")).read().splitlines()
snapshot = "../model/{}_{}/unet_3D_dt".format(args.exp, args.labeled_num)
os.makedirs(snapshot)
with open(os.path.join(snapshot, "log.txt"), "w") as log:
    for i, stamp in enumerate(["10:00:00.000", "10:00:02.000", "10:00:05.000", "10:00:08.500"], start=1):
        log.write("[%s] iteration %d : loss : %f, loss_ce: 0.5, loss_dice: 0.5\\n" % (stamp, i, 1.0 / i))
seen = {
    "device": str(net(x).device), "compose": compose(3), "grid": list(make_grid(torch.ones(3, 1, 2, 2), 2).shape),
    "lines": lines, "case_exists": os.path.isfile(os.path.join(args.root_path, "data", lines[0] + ".h5")),
    "max_iterations": args.max_iterations, "cwd_name": os.path.basename(os.getcwd()),
}
json.dump(seen, open("../seen.json", "w"))
'''


def test_stand_in_compose_applies_in_order_and_make_grid_tiles_rows() -> None:
    assert _compose([lambda s: s + 1, lambda s: 2 * s])(3) == 8
    images = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1).expand(3, 1, 2, 3)  # image i is all i
    grid = _make_grid(images, nrow=2, padding=1)
    assert grid.shape == (1, 2 * 3 + 1, 2 * 4 + 1)  # 2 rows, 2 columns of 2x3 with a 1-pixel border
    assert torch.equal(grid[0, 1:3, 1:4], torch.zeros(2, 3)) and torch.equal(grid[0, 1:3, 5:8], torch.ones(2, 3))
    assert torch.equal(grid[0, 4:6, 1:4], torch.full((2, 3), 2.0)) and grid[0, 4:6, 5:8].abs().sum() == 0
    assert grid[0, 0].abs().sum() == 0 and grid[0, :, 4].abs().sum() == 0  # the padding stays zero
    normalised = _make_grid(images, nrow=3, padding=0, normalize=True)
    assert normalised.min() == 0 and normalised.max() == 1


def test_the_launcher_wants_a_script_first(capsys) -> None:
    assert main([]) == 2 and main(["--max_iterations", "3"]) == 2
    assert capsys.readouterr().err.startswith("usage: run_original_code.py SCRIPT.py")


def test_the_original_setting_runs_the_released_script_on_a_250_line_view_of_the_cases(tmp_path: Path) -> None:
    released = tmp_path / "released_code"
    released.mkdir()
    (released / "train_UGMCL_3D.py").write_text(FAKE_RELEASED_SCRIPT)
    root = tmp_path / "data"
    names = write_synthetic_h5_dataset(root, n_cases=5, shape=(8, 8, 8), seed=0, n_val=1, n_test=1)
    args = bench_train_loop._parse(
        ["--original_code", str(released), "--root_path", str(root), "--iters", "4", "--skip", "1",
         "--settings", "fast"]
    )
    assert args.settings == ["original", "fast"]  # --original_code adds the released code as the first setting

    result = bench_train_loop.run_setting(args, "original", root, tmp_path / "work")

    assert result["s_per_iter"] == pytest.approx(3.25)  # gaps after iteration 1: 3.0 and 3.5 s, median 3.25
    assert result["loss"] == pytest.approx(0.25) and result["peak_gb"] > 0
    seen = json.loads((tmp_path / "work" / "original" / "seen.json").read_text())
    assert seen["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert seen["compose"] == 8 and seen["grid"][1:] == [10, 10]  # 2 rows and columns of (2 + 2), + 2
    assert seen["lines"] == [names[i % 3] for i in range(250)]  # the 3 training cases, cycled to 250 lines
    assert seen["case_exists"] and seen["max_iterations"] == 4
    assert seen["cwd_name"] == "original_code"  # a copy: the released checkout is not written to
    assert sorted(p.name for p in released.iterdir()) == ["train_UGMCL_3D.py"]


def test_the_original_setting_refuses_a_missing_script_and_other_problem_sizes(tmp_path: Path, capsys) -> None:
    for argv, message in [
        (["--original_code", str(tmp_path)], f"--original_code {tmp_path}: no train_UGMCL_3D.py there"),
        (["--settings", "original"], "the setting 'original' needs --original_code"),
    ]:
        with pytest.raises(SystemExit) as stop:
            bench_train_loop._parse(argv)
        assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(message)
    (tmp_path / "train_UGMCL_3D.py").write_text("")
    with pytest.raises(SystemExit):
        bench_train_loop._parse(["--original_code", str(tmp_path), "--patch", "64"])
    assert "fixes patch 96, batch 4" in capsys.readouterr().err


# Plays the released code/ folder for bench_infer: net_factory_3d and test_3D_util.test_single_case (all background).
FAKE_NET_FACTORY = '''
import json, torch

class Recorder(torch.nn.Module):
    def load_state_dict(self, state, strict=True):
        json.dump({k: float(v.double().sum()) for k, v in state.items()}, open("../seen_weights.json", "w"))

def net_factory_3d(net_type, in_chns, class_num):
    assert (net_type, in_chns, class_num) == ("unet_3D_dt", 1, 2)
    return Recorder().cuda()
'''
FAKE_TEST_UTIL = '''
import numpy as np

def test_single_case(net, image, stride_xy, stride_z, patch_size, num_classes=1):
    assert (stride_xy, stride_z, list(patch_size), num_classes) == (16, 16, [32, 32, 32], 2)
    return np.zeros(image.shape, dtype=np.int64)
'''


def test_infer_bench_times_the_released_test_single_case_and_compares_its_labels(tmp_path: Path, capsys) -> None:
    import bench_infer

    from networks.unet_3D import unet_3D_dt
    from utils.sliding_window import predict_volume_labels

    released = tmp_path / "code"
    (released / "networks").mkdir(parents=True)
    (released / "networks" / "net_factory_3d.py").write_text(FAKE_NET_FACTORY)
    (released / "test_3D_util.py").write_text(FAKE_TEST_UTIL)
    args = ["--shapes", "32", "32", "32", "--patch", "32", "--stride", "16", "--sw_batch", "1", "--blends", "uniform"]

    assert bench_infer.main([*args, "--original_code", str(released)]) == 0

    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 32x32x32")]
    assert [r[3].strip() for r in rows] == ["plain", "fast", "original"]  # the released code's row comes last
    torch.manual_seed(0)
    net = unet_3D_dt(n_classes=2, in_channels=1).eval()  # the bench's seeded network
    plain = predict_volume_labels(net, bench_infer.make_volume((32, 32, 32)), (32, 32, 32), 16, 16)
    assert int(plain.sum()) > 0  # so that "all background" differs somewhere
    assert rows[2][8].strip().endswith(f"({int(plain.sum())} differ)")  # its labels against our plain path
    seen = json.loads((tmp_path / "seen_weights.json").read_text())
    assert seen == {k: pytest.approx(float(v.double().sum())) for k, v in net.state_dict().items()}
    original_wall, fastest = float(rows[2][4]), min(float(r[4]) for r in rows[:2])
    summary = [line for line in out.splitlines() if line.startswith("32x32x32: the released code")]
    assert len(summary) == 1 and f"{original_wall:.2f} s" in summary[0] and f"{fastest:.2f} s" in summary[0]
    assert f"on {int(plain.sum())} voxels" in summary[0]

    with pytest.raises(SystemExit) as stop:
        bench_infer.main([*args, "--original_code", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("no test_3D_util.py there")


def test_both_allocators_pass_the_released_code_to_the_default_run_only() -> None:
    from bench_infer import without_option

    argv = ["--repeats", "3", "--original_code", "/x/code", "--blends", "uniform", "--original_code=/y", "--json"]
    assert without_option(argv, "--original_code") == ["--repeats", "3", "--blends", "uniform", "--json"]
    assert without_option(["--original_codes", "1"], "--original_code") == ["--original_codes", "1"]
