"""Time the training augmentation per sample: whole-volume read + rot/flip + crop against patch reads (issue #7).

Run from the repository root::

    python bench/bench_data.py                          # synthetic 160x190x140 cases (a cropped BraTS brain), 96^3
    python bench/bench_data.py --root_path ../data/BraTS2019 --samples 40

Both pipelines draw the same random numbers and return the same patches (checked here on every sample):

* ``released``: ``Compose([RandomRotFlip(), RandomCrop(patch), ToTensor()])``, which reads the whole case from
  its HDF5 file and rotates the whole volume before cropping;
* ``patch read``: ``Compose([RandomRotFlipCrop(patch), ToTensor()])`` (what the trainer uses), which maps the
  window back to the unrotated volume and reads and rotates only that box.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root_path", default=None, help="pre-processed data (default: synthetic cases)")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 190, 140], help="synthetic case shape")
    parser.add_argument("--patch", type=int, default=96, help="cubic patch side. Default 96")
    parser.add_argument("--samples", type=int, default=30, help="samples per pipeline. Default 30")
    args = parser.parse_args(argv)

    import torch

    from dataloaders.brats2019 import BraTS2019
    from dataloaders.transforms import Compose, RandomCrop, RandomRotFlip, RandomRotFlipCrop, ToTensor

    patch = (args.patch,) * 3
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(args.root_path) if args.root_path else Path(tmp)
        if not args.root_path:
            from synthetic_h5 import write_synthetic_h5_dataset

            write_synthetic_h5_dataset(root, n_cases=6, shape=args.shape, seed=0, n_val=1, n_test=1)
        pipelines = {
            "released": BraTS2019(root, "train", transform=Compose([RandomRotFlip(), RandomCrop(patch), ToTensor()])),
            "patch read": BraTS2019(root, "train", transform=Compose([RandomRotFlipCrop(patch), ToTensor()])),
        }
        n = len(pipelines["released"])
        times: dict[str, list[float]] = {name: [] for name in pipelines}
        for i in range(args.samples):
            outputs = []
            for name, dataset in pipelines.items():  # the same seed for both: the same draws
                np.random.seed(i)
                t0 = time.perf_counter()
                outputs.append(dataset[i % n])
                times[name].append(time.perf_counter() - t0)
            if not all(torch.equal(outputs[0][k], outputs[1][k]) for k in ("image", "label")):
                print(f"sample {i}: the two pipelines disagree", file=sys.stderr)
                return 1
    base = statistics.median(times["released"])
    print(f"\nTraining augmentation, patch {args.patch}^3, {args.samples} samples per pipeline, "
          f"{'cases in ' + args.root_path if args.root_path else 'synthetic cases ' + 'x'.join(map(str, args.shape))}; "
          "identical patches\n")
    print("| pipeline | ms/sample (median) | speed-up |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {base / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
