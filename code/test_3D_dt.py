"""Test a trained UG-MCL network on the BraTS2019 test split (SPEC section 4).

Run from ``code/``, like the original::

    python test_3D_dt.py --exp BraTs2019_UGMCL_50 --model unet_3D_dt
    python test_3D_dt.py --exp BraTs2019_UGMCL_25 --native --lcc --device cuda:0
    python test_3D_dt.py --checkpoint my.pth --root_path /data/BraTS2019 --out_dir /tmp/preds --no_save

It loads ``<model_dir>/<exp>/<model>/<model>_best_model.pth`` (or ``--checkpoint``), predicts every case listed in
``<root_path>/<split>.txt`` with the sliding window, and writes into ``<model_dir>/<exp>/<model>_predictions/`` (or
``--out_dir``): ``metrics.csv`` (one row per case), ``summary.json`` (mean/std per metric, NaN and empty-mask counts,
the configuration and the checkpoint's git blob id) and the NIfTI files ``<case>_{pred,img,gt}.nii.gz`` (plus
``_unc`` with ``--mc_passes``, ``_pred_native`` with ``--native``). Files are written atomically and nothing else
in the folder is removed (the original deleted the whole folder first). A table of mean +- std is printed.

Exit status: 0 on success; 1 when the checkpoint is missing or does not fit the model, a case file is missing or
corrupt, or an option value is invalid (one line on stderr says which file and why); 2 on unknown arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import speed
from dataloaders.brats2019 import CaseDataset
from dataloaders.case_checks import image_channels
from dataloaders.datasets import DATASETS
from engine.config import described_classes
from engine.evaluate import CaseFileError, Outputs, evaluate, format_summary_table
from engine.prediction import add_prediction_arguments, window_from_args
from networks.net_factory_3d import NETWORKS_3D, net_factory_3d, width_kwargs
from utils.checkpoint import CheckpointError, CheckpointNotFoundError, git_blob_id, load_weights
from utils.device import get_device


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; defaults reproduce the released test script."""
    parser = argparse.ArgumentParser(
        description="Evaluate a trained network on a BraTS2019 split: per-case metrics, summary and NIfTI outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="brats2019",
                        help="layout of the data (dataloaders/datasets.py); its patch and strides are the defaults")
    parser.add_argument("--root_path", default=None, help="dataset folder (default: the dataset's, ../data/BraTS2019)")
    parser.add_argument("--split_dir", default=None, help="folder of the split lists (default: --root_path)")
    parser.add_argument("--exp", default="BraTs2019_UGMCL_50", help="experiment name (folder under --model_dir)")
    parser.add_argument("--model", default="unet_3D_dt", choices=sorted(NETWORKS_3D), help="network name")
    parser.add_argument("--split", default="test", help="split list to evaluate (<root_path>/<split>.txt)")
    parser.add_argument(
        "--checkpoint", default=None, help="weights file; default <model_dir>/<exp>/<model>/<model>_best_model.pth"
    )
    parser.add_argument("--model_dir", default="../model", help="folder holding the experiments")
    parser.add_argument("--mc_passes", type=int, default=0, help="MC-dropout passes for uncertainty (0 = off)")
    parser.add_argument("--out_dir", default=None, help="output folder; default <model_dir>/<exp>/<model>_predictions")
    parser.add_argument("--native", action="store_true", help="also write the prediction in the original scan space")
    parser.add_argument("--metric_backend", choices=("ours", "medpy"), default="ours", help="surface-distance code")
    parser.add_argument("--feature_scale", type=int, default=4, help="network width divisor, as in training (published: 4)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="output classes (default: those of <root>/dataset.json when prepare_dataset.py wrote it, else 2)")
    parser.add_argument("--in_channels", type=int, default=None, help="input channels (default: the data's)")
    parser.add_argument("--no_save", action="store_true", help="metrics only: write no NIfTI files")
    parser.add_argument("--overlay", action="store_true", help="also write a PNG overlay per case")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    add_prediction_arguments(parser)
    speed.add_arguments(parser)
    return parser


def default_checkpoint(model_dir: str | Path, exp: str, model: str) -> Path:
    """``<model_dir>/<exp>/<model>/<model>_best_model.pth``, where training saves the best model."""
    return Path(model_dir) / exp / model / f"{model}_best_model.pth"


def _missing_checkpoint_hint(exp: str, model: str) -> str:
    match = re.fullmatch(r"BraTs2019_UGMCL_(25|50)", exp)
    if match and model == "unet_3D_dt":
        return f"; download the published weights with: python download_pretrained.py --labeled_num {match.group(1)}"
    return "; train one with train_UGMCL_3D.py or pass --checkpoint"


def _fill_dataset_defaults(args: argparse.Namespace) -> None:
    """Options left unset take the dataset's values: folder, patch, strides; the input channels of its first case."""
    layout = DATASETS[args.dataset]
    if args.root_path is None:
        args.root_path = layout.defaults.get("root_path")
        if args.root_path is None:
            raise ValueError(f"--dataset {args.dataset} has no default folder: give --root_path")
    if args.patch_size is None:
        args.patch_size = list(layout.defaults.get("patch_size", (96, 96, 96)))
    for name in ("stride_xy", "stride_z"):
        if getattr(args, name) is None and name in layout.defaults:
            setattr(args, name, layout.defaults[name])
    if args.num_classes is None:
        args.num_classes = described_classes(Path(args.root_path) / "dataset.json") or 2
    if args.in_channels is None:
        first = CaseDataset(args.root_path, args.split, layout=layout, split_dir=args.split_dir).image_list[:1]
        if not first:
            raise ValueError(f"{layout.split_path(args.root_path, args.split, args.split_dir)} lists no case")
        args.in_channels = image_channels(layout.case_path(args.root_path, first[0]))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; return the exit status (0 ok, 1 error with one line on stderr)."""
    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.model_dir, args.exp, args.model)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.model_dir) / args.exp / f"{args.model}_predictions"
    try:
        device = get_device(args.device)
        _fill_dataset_defaults(args)
        window = window_from_args(args)
        net = net_factory_3d(args.model, in_chns=args.in_channels, class_num=args.num_classes,
                             **width_kwargs(args.model, args.feature_scale))
        load_weights(net, checkpoint, map_location="cpu")
        fast = speed.prepare_inference(net, speed.options_from_args(args), device)
        for note in fast.notes:
            print(f"note: {note}", file=sys.stderr)
        config = {
            "exp": args.exp,
            "model": args.model,
            "checkpoint": str(checkpoint),
            "checkpoint_git_blob_id": git_blob_id(checkpoint),
            "feature_scale": args.feature_scale,
            "num_classes": args.num_classes,
            "in_channels": args.in_channels,
            "speed": vars(fast.options),
        }
        outputs = Outputs(nifti=not args.no_save, native=args.native, overlay_png=args.overlay)
        result = evaluate(fast.net, args.root_path, out_dir, window=window, split=args.split, dataset=args.dataset,
                          split_dir=args.split_dir, device=device, lcc=args.lcc, metric_backend=args.metric_backend, outputs=outputs,
                          around_case=fast.around_case, config=config, progress=not args.no_progress)
    except CheckpointNotFoundError as err:
        print(f"error: {err}{_missing_checkpoint_hint(args.exp, args.model)}", file=sys.stderr)
        return 1
    except (CheckpointError, CaseFileError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary_table(result.summary))
    print(f"results written to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
