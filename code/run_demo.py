"""End-to-end demo on a laptop CPU: synthetic BraTS-layout data -> preprocess -> train UG-MCL -> test.

``make demo`` (or ``cd code && python run_demo.py``) runs the very same entry scripts a user runs on the
real BraTS2019 release, with a CPU-sized configuration:

1. ``make_synthetic_brats.py``: raw cases ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` in ``../demo_data/raw``;
2. ``preprocess_brats2019.py``: ``../demo_data/BraTS2019/data/<case>.h5`` and a seeded split;
3. ``train_UGMCL_3D.py``: UG-MCL with a few labelled cases, small patches, a narrow U-Net;
4. ``test_3D_dt.py``: sliding-window test, Dice / Jaccard / HD95 / ASD table, NIfTI predictions
   (with the original scan's affine) and a PNG overlay (FLAIR, label, prediction, uncertainty).

Each step is skipped when its output already exists (``make clean-demo`` starts over).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import make_synthetic_brats
import preprocess_brats2019
import test_3D_dt
import train_UGMCL_3D


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo_dir", default="../demo_data", help="raw and preprocessed synthetic data")
    p.add_argument("--model_dir", default="../model")
    p.add_argument("--num_cases", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    p.add_argument("--labeled_num", type=int, default=4)
    p.add_argument("--max_iterations", type=int, default=150)
    p.add_argument("--patch_size", type=int, nargs=3, default=[32, 32, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--feature_scale", type=int, default=8, help="U-Net width divisor (published: 4)")
    p.add_argument("--mc_passes", type=int, default=4, help="teacher MC-dropout passes (published: 8)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    return p


def _run(name: str, main, argv: list[str]) -> None:
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    t0 = time.time()
    code = main(argv)
    if code:
        raise SystemExit(f"demo: step {name!r} failed with exit code {code}")
    print(f"=== {name} done in {time.time() - t0:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = Path(args.demo_dir)
    raw, root = demo / "raw", demo / "BraTS2019"
    exp = "Demo_UGMCL"
    run = Path(args.model_dir) / f"{exp}_{args.labeled_num}" / "unet_3D_dt"
    patch = [str(p) for p in args.patch_size]
    stride = str(args.patch_size[0] // 2)
    t0 = time.time()

    if len(list(raw.glob("*/*_seg.nii.gz"))) < args.num_cases:
        _run("synthetic data", make_synthetic_brats.main,
             ["--out_dir", str(raw), "--num_cases", str(args.num_cases), "--shape", *map(str, args.shape),
              "--seed", str(args.seed)])
    _run("preprocess", preprocess_brats2019.main, ["--raw_dir", str(raw), "--out_dir", str(root), "--seed", str(args.seed)])
    if not (run / "unet_3D_dt_best_model.pth").is_file() or not (run / "checkpoint_latest.pth").is_file():
        _run("train", train_UGMCL_3D.main,
             ["--root_path", str(root), "--exp", exp, "--model_dir", args.model_dir,
              "--labeled_num", str(args.labeled_num), "--max_iterations", str(args.max_iterations),
              "--patch_size", *patch, "--feature_scale", str(args.feature_scale), "--mc_passes", str(args.mc_passes),
              "--mc_chunk", "0", "--val_interval", str(max(1, args.max_iterations // 6)),
              "--save_interval", str(max(1, args.max_iterations // 6)), "--num_workers", "1",
              "--stride_xy", stride, "--stride_z", stride, "--seed", str(args.seed), "--device", args.device])
    _run("test", test_3D_dt.main,
         ["--root_path", str(root), "--exp", f"{exp}_{args.labeled_num}", "--model", "unet_3D_dt",
          "--model_dir", args.model_dir, "--patch_size", *patch, "--stride_xy", stride, "--stride_z", stride,
          "--feature_scale", str(args.feature_scale), "--mc_passes", str(args.mc_passes), "--native", "--overlay",
          "--device", args.device])

    pred_dir = Path(args.model_dir) / f"{exp}_{args.labeled_num}" / "unet_3D_dt_predictions"
    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    print(f"  predictions (NIfTI, open in ITK-SNAP / 3D Slicer): {pred_dir}")
    print(f"  per-case metrics and summary:  {pred_dir / 'metrics.csv'}, {pred_dir / 'summary.json'}")
    pngs = sorted(pred_dir.glob("*.png"))
    if pngs:
        print(f"  overlay (FLAIR | label | prediction | uncertainty): {pngs[0]}")
    print(f"  training log and TensorBoard events: {run / 'log.txt'}, `tensorboard --logdir {run / 'log'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
