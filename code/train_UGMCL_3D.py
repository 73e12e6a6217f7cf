"""Train UG-MCL (or a baseline) on preprocessed BraTS2019: ``cd code && python train_UGMCL_3D.py``.

Defaults reproduce the released UG-MCL code (SPEC section 3); every hard-coded number of the original
is an option here with that number as its default. Outputs go to ``../model/<exp>_<labeled_num>/<model>/``.

Multi-GPU, one node: ``torchrun --standalone --nproc_per_node N train_UGMCL_3D.py ...`` trains data-parallel
(``engine/distributed.py``): each process takes one GPU (``cuda:LOCAL_RANK``) and its own batches of
``--batch_size`` patches (``--labeled_bs`` labelled), so an iteration sees N times as many patches; gradients
are averaged and rank 0 alone logs, validates and writes the outputs. Several nodes: the same command on every
node with ``--nnodes M --node_rank i --master_addr HOST --master_port PORT`` in place of ``--standalone``
(every node needs the data at ``--root_path``; the outputs are written on the node of rank 0). ``--resume``
works the same way. Backend nccl on CUDA, gloo with ``--device cpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import speed
from dataloaders.datasets import DATASETS
from engine.config import TrainConfig

DEFAULTS = TrainConfig()


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")


def build_parser(defaults: TrainConfig = DEFAULTS, method: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``method`` fixes ``--method`` for thin baseline entry scripts."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_and_model_arguments(p, defaults)
    _optimisation_arguments(p, defaults)
    _method_arguments(p, defaults, method)
    _newer_method_arguments(p, defaults)
    _run_control_arguments(p, defaults)
    speed.add_arguments(p, defaults.speed)
    return p


def _newer_method_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The options of BCP (``methods/bcp.py``; defaults: BCP's LA_BCP_train.py)."""
    g = p.add_argument_group("BCP")
    g.add_argument("--bcp_pretrain_iterations", type=int, default=d.bcp_pretrain_iterations,
                   help="iterations of copy-paste pre-training before the self-training (BCP pre_max_iteration)")
    g.add_argument("--bcp_u_weight", type=float, default=d.bcp_u_weight,
                   help="loss weight of the voxels from an unlabelled image (BCP u_weight)")
    g.add_argument("--bcp_mask_ratio", type=float, default=d.bcp_mask_ratio,
                   help="side of the pasted cuboid / side of the patch (BCP mask_ratio)")
    g.add_argument("--bcp_largest_cc", type=int, choices=[0, 1], default=d.bcp_largest_cc,
                   help="1: keep the largest connected component of each pseudo-label class (BCP nms=1)")


def _data_and_model_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Where the data is, the network and the run's folder."""
    g = p.add_argument_group("data and model (names of the released code)")
    g.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset,
                   help="layout of the data and the papers' defaults for it (dataloaders/datasets.py)")
    g.add_argument("--root_path", default=None,
                   help=f"the dataset's folder (default: {d.root_path} for brats2019, ../data/LA for la, ...)")
    g.add_argument("--split_dir", default=None, help="folder of the split lists (default: --root_path)")
    g.add_argument("--exp", default=None, help=f"experiment name; outputs in <model_dir>/<exp>_<labeled_num>/<model> "
                                               f"(default: {d.exp} for brats2019, LA_UGMCL for la, ...)")
    g.add_argument("--model", default=None,
                   help="network: unet_3D_dt, vnet_dt, unet_3D, vnet, unet_3D_ds (default: the one --method needs)")
    g.add_argument("--model_dir", default="../model", help="parent folder of all run folders")
    g.add_argument("--labeled_num", type=int, default=None,
                   help=f"labelled cases = the first N of the train list (default: {d.labeled_num} for brats2019, 16 for la)")
    g.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help=f"training patch (default: {' '.join(map(str, d.patch_size))} for brats2019, 112 112 80 for la)")
    g.add_argument("--in_channels", type=int, default=None,
                   help="input channels (default: those of the data, e.g. 4 after preprocessing with 4 --modalities)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="output classes (default: those of <root>/dataset.json when prepare_dataset.py wrote it, else 2)")
    g.add_argument("--feature_scale", type=int, default=d.feature_scale, help="network width divisor: U-Nets 64 // N first-stage channels, V-Nets n_filters = 64 // N (4 = published)")


def _optimisation_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The optimiser, the schedule and the seed."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_iterations", type=int, default=None,
                   help=f"(default: {d.max_iterations} for brats2019, 6000 for la, 15000 for pancreas)")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="patches per batch, labelled + unlabelled")
    g.add_argument("--labeled_bs", type=int, default=d.labeled_bs, help="labelled patches per batch")
    g.add_argument("--base_lr", type=float, default=d.base_lr)
    g.add_argument("--lr_schedule", choices=["constant", "poly", "step"], default=None,
                   help="constant (brats2019, released), poly: lr (1 - t/T)^power, step: lr gamma^(t // lr_step) (la)")
    g.add_argument("--poly_power", type=float, default=d.poly_power)
    g.add_argument("--lr_step", type=int, default=d.lr_step, help="step schedule: iterations per decay")
    g.add_argument("--lr_gamma", type=float, default=d.lr_gamma, help="step schedule: factor per decay")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", type=int, default=d.deterministic, help="1: deterministic kernels")


def _method_arguments(p: argparse.ArgumentParser, d: TrainConfig, method: str | None) -> None:
    """The method and its hyper-parameters (``method`` fixes ``--method`` for the thin scripts)."""
    g = p.add_argument_group("method")
    if method is None:
        from methods import METHODS

        g.add_argument("--method", choices=sorted(METHODS), default=d.method)
    g.add_argument("--variant", choices=["released", "paper"], default=d.variant,
                   help="released: tanh of the seg logits as SDF (published); paper: separate SDF head + GT SDF")
    g.add_argument("--ema_decay", type=float, default=d.ema_decay)
    g.add_argument("--consistency", type=float, default=d.consistency, help="final consistency weight")
    g.add_argument("--consistency_rampup", type=float, default=d.consistency_rampup)
    g.add_argument("--consistency_interval", type=int, default=d.consistency_interval,
                   help="the weight ramp advances once every this many iterations")
    g.add_argument("--mc_passes", "--T", dest="mc_passes", type=int, default=d.mc_passes, help="MC-dropout passes T")
    g.add_argument("--mc_chunk", type=int, default=d.mc_chunk, help="teacher passes per forward (0 = all)")
    g.add_argument("--low_memory", type=int, choices=[0, 1], default=d.low_memory,
                   help="1: teacher passes before the student's forward, B rows per forward: a lower peak memory, "
                        "the released losses bit for bit on CPU (on CUDA another random draw); 0: the released order")
    g.add_argument("--noise_std", type=float, default=d.noise_std)
    g.add_argument("--noise_clip", type=float, default=d.noise_clip)
    g.add_argument("--threshold_start", type=float, default=d.threshold_start, help="tau(0) / ln 2")
    g.add_argument("--threshold_end", type=float, default=d.threshold_end, help="tau(end) / ln 2")
    g.add_argument("--threshold_rampup", type=int, default=d.threshold_rampup, help="default: max_iterations")
    g.add_argument("--sdf_k", type=float, default=d.sdf_k, help="k in sigmoid(-k * sdf)")
    g.add_argument("--beta", type=float, default=d.beta, help="paper variant: seg vs SDF consistency balance")
    g.add_argument("--consistency_rows", choices=["released", "all", "unlabeled"], default=d.consistency_rows,
                   help="baselines: batch rows of the unsupervised term (released = as in each method's code)")
    g.add_argument("--dtc_sdf_weight", type=float, default=d.dtc_sdf_weight, help="DTC: SDF regression weight")


def _run_control_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Validation, checkpoints, workers, device and resume."""
    g = p.add_argument_group("run control")
    g.add_argument("--val_interval", type=int, default=d.val_interval)
    g.add_argument("--save_interval", type=int, default=d.save_interval)
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 where supported, else fp16)")
    g.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pth")
    g.add_argument("--stride_xy", type=int, default=None,
                   help="validation sliding-window stride (default: two thirds of the patch)")
    g.add_argument("--stride_z", type=int, default=None, help="(default: two thirds of the patch)")
    g.add_argument("--sw_batch", type=int, default=d.sw_batch)
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")

def config_from_args(args: argparse.Namespace, method: str | None = None) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["patch_size"] = tuple(args.patch_size) if args.patch_size is not None else None
    values["speed"] = speed.options_from_args(args)
    if method is not None:
        values["method"] = method
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None, method: str | None = None) -> int:
    args = build_parser(method=method).parse_args(argv)
    from engine.trainer import TrainingError, train

    try:
        cfg = config_from_args(args, method)
        summary = train(cfg, model_dir=args.model_dir, progress=not args.no_progress)
    except (TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 0
    best = summary["best"]
    print(f"done: {summary['iterations']} iterations, best val dice {best['dice']:.4f} "
          f"(iteration {best['iteration']}); outputs in {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
