"""Time and profile one UG-MCL training iteration under several settings, in one process (issue #7, GPU work).

Run from the repository root::

    python bench/profile_train_step.py --device cuda                  # published size: 96^3, batch 4, T = 8
    python bench/profile_train_step.py --device cpu --patch 32 --feature_scale 8 --T 2 --iters 1 --profile none

Each variant builds the seeded ``unet_3D_dt`` and UG-MCL method afresh, runs ``--warmup`` iterations, then times
``--iters`` (median, device synchronised). A variant is ``precision/network/order/chunk``: ``fp32`` or ``bf16``
(autocast), ``plain`` (``InstanceNorm3d`` modules) or ``fast`` (fused norm + ReLU, channels-last), ``lowmem``
(teacher first, B rows per forward) or ``released`` order, and ``mc_chunk`` (0 = all T passes in one forward);
an optional fifth part ``compile`` adds ``--compile 1`` (e.g. ``bf16/plain/released/0/compile``; give it a warm-up).
With ``--profile``, the named variants get one more iteration under ``torch.profiler`` and the table of their
most expensive operators (self device time) is printed: where the time goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import _batch, add_problem_size_arguments, run_iteration  # noqa: E402

from utils.device import check_device_argument  # noqa: E402

DEFAULT_VARIANTS = [
    "fp32/plain/released/2",
    "fp32/fast/released/2",
    "fp32/fast/lowmem/2",
    "bf16/plain/released/2",
    "bf16/fast/released/2",
    "bf16/fast/released/0",
    "bf16/fast/lowmem/2",
]


def parse_variant(text: str) -> dict[str, Any]:
    """``"bf16/fast/lowmem/2"`` -> ``{"amp": True, "fast": True, "low_memory": True, "mc_chunk": 2, "compile": False}``.

    A fifth part ``compile`` (``"bf16/plain/released/0/compile"``) runs the forwards through ``torch.compile`` as
    ``--compile 1`` does (not with the ``fast`` network).
    """
    parts = text.split("/")
    compiled = len(parts) == 5 and parts[4] == "compile"
    if compiled:
        parts = parts[:4]
    if len(parts) != 4 or parts[0] not in ("fp32", "bf16") or parts[1] not in ("plain", "fast"):
        raise ValueError(f"variant {text!r} is not precision/network/order/chunk[/compile], e.g. bf16/fast/lowmem/2")
    if parts[2] not in ("lowmem", "released") or not parts[3].isdigit():
        raise ValueError(f"variant {text!r}: order is lowmem or released, chunk a non-negative int")
    if compiled and parts[1] == "fast":
        raise ValueError(f"variant {text!r}: compile goes with the plain network only (as --compile 1)")
    return {"amp": parts[0] == "bf16", "fast": parts[1] == "fast", "low_memory": parts[2] == "lowmem",
            "mc_chunk": int(parts[3]), "compile": compiled}


def run_variant(args: argparse.Namespace, name: str, profile: bool) -> tuple[float, float, str]:
    """Median seconds per iteration, peak device memory (GB) and, with ``profile``, the operator table."""
    import torch

    from engine.config import TrainConfig
    from methods.ugmcl import UGMCL
    from networks.unet_3D import unet_3D_dt
    from speed import SpeedOptions, make_fast, prepare_training
    from speed.compile import compile_networks
    from utils.device import get_device

    v = parse_variant(name)
    device = get_device(args.device)
    torch.manual_seed(1337)
    cfg = TrainConfig(patch_size=(args.patch,) * 3, batch_size=args.batch, labeled_bs=args.labeled_bs,
                      mc_passes=args.T, mc_chunk=v["mc_chunk"], feature_scale=args.feature_scale, max_iterations=30000,
                      low_memory=int(v["low_memory"]))
    student = unet_3D_dt(feature_scale=args.feature_scale, n_classes=2, in_channels=1).to(device)
    passes = prepare_training(student, SpeedOptions(keep_freed_memory=0), device).passes  # dropout drawn ahead
    if v["fast"]:
        make_fast(student)  # on any device here: the door itself keeps CUDA plain
    student.train()
    method = UGMCL(student, cfg, passes=passes)
    if v["compile"]:
        compile_networks(*method.networks())  # the trainer's own --compile 1; warm-up iterations compile
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batch = _batch(args, device)
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=v["amp"] and dtype == torch.float16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def iteration(step: int) -> None:
        run_iteration(method, optimizer, scaler, batch, step, device.type, dtype if v["amp"] else None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.iters):
        sync()
        t0 = time.perf_counter()
        iteration(step)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    table = ""
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        sort = "self_cpu_time_total"
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            sort = "self_cuda_time_total"
        with torch.profiler.profile(activities=activities) as prof:
            iteration(args.warmup + args.iters)
            sync()
        table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
    return statistics.median(times), peak, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_size_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]. Default auto")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per variant. Default 5")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first. Default 2")
    parser.add_argument("--cudnn_benchmark", type=int, default=1, help="1: cuDNN autotuning (default)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="precision/network/order/chunk")
    parser.add_argument("--profile", nargs="*", default=["bf16/fast/released/0", "fp32/plain/released/2"],
                        help="variants to profile ('none': no profile). Default the fastest guess and the plain one")
    parser.add_argument("--rows", type=int, default=18, help="operators per profile table. Default 18")
    args = parser.parse_args(argv)
    for name in args.variants:
        parse_variant(name)  # fail early on a typo
    check_device_argument(parser, args.device)
    import torch

    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    rows = []
    for name in args.variants:
        seconds, peak, table = run_variant(args, name, name in args.profile)
        rows.append((name, seconds, peak))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the variant's tensors are gone with run_variant's frame
        print(f"{name}: {seconds:.3f} s/iter, peak {peak:.2f} GB", file=sys.stderr, flush=True)
        if table:
            print(f"\nprofile of one iteration, {name}:\n{table}", flush=True)
    device = args.device
    print(f"\nUG-MCL iteration, patch {args.patch}^3, batch {args.batch}, T = {args.T}, feature_scale "
          f"{args.feature_scale}, {device}, cudnn.benchmark {bool(args.cudnn_benchmark)}, torch {torch.__version__}\n")
    print("| variant (precision/network/order/mc_chunk) | s/iter | vs first | peak GB |")
    print("|---|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.3f} | {rows[0][1] / seconds:.2f}x | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
