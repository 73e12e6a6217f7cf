"""Time one UG-MCL training iteration and its peak memory, released-like path against the speed-ups.

Run from the repository root::

    python bench/bench_train.py                                   # 64^3 patches, batch 4 (2 labelled), T = 8
    python bench/bench_train.py --patch 64 --batch 2 --labeled_bs 1 --iters 2
    python bench/bench_train.py --patch 96 --batch 4 --iters 1 --warmup 0 --configs baseline all
    python bench/bench_train.py --amp                             # adds a bf16-autocast row (not loss-identical)

Every configuration runs in its own fresh subprocess (so its peak RSS is its own) on the same seeded batch, weights
and random stream, and performs ``warmup + iters`` full iterations of the training loop (``UGMCL.training_step``,
backward, SGD step, EMA update), timing the last ``iters``. The configurations switch the optimisations on one
after the other:

==================  ==================================================================================
``baseline``        released-like: contiguous layout, ``InstanceNorm3d`` + ``ReLU`` modules, the student's
                    forward before the teacher's passes, T passes in chunks of 2 (``mc_chunk=2``)
``+low_memory``     ``low_memory=1`` with ``speed.passes.PredrawnPasses``: the teacher's passes run before the student's forward, each chunk
                    of Monte-Carlo passes as forwards of B rows (dropout masks drawn ahead, so the random
                    stream is unchanged): lower peak memory, same losses bit for bit
``+fused_norm``     InstanceNorm + ReLU as one step (``speed.fused_norm``, ``speed.recompute``)
``+channels_last``  conv weights and so all activations in ``channels_last_3d`` (``speed.layout``)
``+malloc``         glibc ``mallopt`` keeps freed memory for reuse instead of unmapping it (a process-wide
                    setting, ``speed.allocator.keep_freed_memory``, on by default when training on CPU,
                    ``--keep_freed_memory``): almost no page faults, higher peak RSS
``+malloc_teacher`` instead of ``+malloc``: glibc keeps freed memory only while the teacher's passes run; the
                    student's large blocks are mapped and unmapped again (``speed.allocator.keeping_freed_memory``,
                    ``--keep_freed_memory 2``, the CPU default of training): the repeated passes stop
                    page-faulting, the peak RSS stays about that of ``+channels_last``
``+thp``            instead of ``+malloc``: ``THP_MEM_ALLOC_ENABLE=1`` (torch's own switch, read at its first
                    allocation) backs large tensors with 2 MB transparent huge pages: 50x fewer page faults,
                    but slower on the 2-core machine (the kernel compacts memory for them; results/cpu.md)
``+thp_teacher``    ``+malloc_teacher`` and ``+thp``; ``+thp_malloc``: ``+malloc`` and ``+thp``
``+cudnn_benchmark`` (CUDA) instead of ``+malloc``: ``torch.backends.cudnn.benchmark``, cuDNN times its
                    algorithms once per shape and keeps the fastest (``--deterministic 0`` in training)
``+bf16``           (``--amp``) the ``+channels_last`` set under ``torch.autocast`` bf16 (CPU) / bf16|fp16 (CUDA),
                    with cuDNN autotuning on CUDA
==================  ==================================================================================

``all`` is the last fp32 configuration. The table gives wall and CPU seconds per iteration (the machine may be
shared: with ``--rounds`` the configurations alternate and each keeps its fastest run; CPU seconds count the
work of both threads, and also the spinning of idle OpenMP threads when the machine is busy), peak memory (``ru_maxrss`` on CPU, which includes the ~0.35 GB
of the Python process and torch; ``torch.cuda.max_memory_allocated`` on CUDA; the peak over the warm-up iterations
too: with ``+malloc`` the heap still grows in the second iteration, so ``--warmup 0 --iters 1`` understates it), and the largest difference of the
per-iteration losses from the baseline's: at the first iteration (same weights, same random numbers: float
rounding only) and over all iterations (the optimiser steps amplify rounding, mostly through the steep
``sigmoid(-1500 d)`` of the SDF loss and ReLU/uncertainty-mask flips, so later iterations drift apart by up to ~1e-3
for any change of float arithmetic). ``+bf16`` is not expected to match. Exits with status 1 when an fp32
configuration's first-iteration loss differs from the baseline's by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CODE = Path(__file__).resolve().parents[1] / "code"
sys.path.insert(0, str(CODE))

from speed.allocator import keep_freed_memory  # noqa: E402

CONFIGS: dict[str, dict[str, bool]] = {
    "baseline": {},
    "+low_memory": {"low_memory": True},
    "+fused_norm": {"low_memory": True, "fused_norm": True},
    "+channels_last": {"low_memory": True, "fused_norm": True, "channels_last": True},
    "+malloc": {"low_memory": True, "fused_norm": True, "channels_last": True, "malloc": True},
    "+malloc_teacher": {"low_memory": True, "fused_norm": True, "channels_last": True, "malloc_teacher": True},
    "+thp": {"low_memory": True, "fused_norm": True, "channels_last": True, "thp": True},
    "+thp_teacher": {"low_memory": True, "fused_norm": True, "channels_last": True, "malloc_teacher": True,
                     "thp": True},
    "+thp_malloc": {"low_memory": True, "fused_norm": True, "channels_last": True, "malloc": True, "thp": True},
    "+cudnn_benchmark": {"low_memory": True, "fused_norm": True, "channels_last": True, "cudnn_benchmark": True},
    "+bf16": {"low_memory": True, "fused_norm": True, "channels_last": True, "cudnn_benchmark": True, "amp": True},
}
ALIASES = {"all": "+malloc"}
NOT_BY_DEFAULT = ("+bf16", "+cudnn_benchmark", "+thp_teacher", "+thp_malloc")


def fixed_batch(patch: tuple[int, int, int], batch_size: int, labeled_bs: int, device: Any = "cpu") -> Any:
    """A fixed batch of ``patch``-sized rows: noise images, an ellipsoid (a ball in a cubic patch) of a quarter
    of each side's radius labelled and brightened in each labelled row."""
    import torch

    from methods.base import Batch

    g = torch.Generator().manual_seed(2024)
    image = torch.randn(batch_size, 1, *patch, generator=g)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in patch), indexing="ij"))
    label = torch.zeros(batch_size, *patch, dtype=torch.long)
    sides = torch.tensor(patch, dtype=torch.float32)
    squash = ((sides[0] / sides) ** 2).view(3, 1, 1, 1)  # all ones for a cubic patch
    for i in range(labeled_bs):
        centre = (torch.rand(3, generator=g) * 0.5 + 0.25) * sides
        label[i] = ((((grid - centre.view(3, 1, 1, 1)) ** 2) * squash).sum(0) < (sides[0] / 4) ** 2).long()
        image[i] += 2.0 * label[i]
    return Batch(image.to(device), label.to(device), labeled_bs)


def _batch(args: argparse.Namespace, device: Any) -> Any:
    """:func:`fixed_batch` of the cubic ``--patch``, ``--batch`` and ``--labeled_bs``."""
    return fixed_batch((args.patch,) * 3, args.batch, args.labeled_bs, device)


def run_iteration(method: Any, optimizer: Any, scaler: Any, batch: Any, step: int, device_type: str,
                  amp_dtype: Any = None) -> float:
    """One full training iteration (UG-MCL step under autocast when ``amp_dtype`` is set, backward, SGD step, EMA
    update); returns the loss."""
    import torch

    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss, _ = method.training_step(batch, step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    method.after_optimizer_step(step)
    return float(loss.detach())


def _peak_memory_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def worker(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run one configuration in this process and return its timings, memory and losses."""
    opts = CONFIGS[name]
    malloc = keep_freed_memory(args.malloc_mmap_mb << 20) if opts.get("malloc") else False
    if opts.get("thp"):
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch at its first allocation
    import torch

    from engine.config import TrainConfig
    from methods.ugmcl import UGMCL
    from networks.unet_3D import unet_3D_dt
    from speed.dropout import predraw_dropout
    from speed.fused_norm import fuse_norm_relu
    from speed.layout import to_channels_last
    from speed.passes import PredrawnPasses
    from speed.recompute import keep_activations_as_sources
    from utils.device import get_device

    device = get_device(args.device)
    torch.backends.cudnn.benchmark = bool(opts.get("cudnn_benchmark"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    cfg = TrainConfig(
        patch_size=(args.patch,) * 3,
        batch_size=args.batch,
        labeled_bs=args.labeled_bs,
        mc_passes=args.T,
        mc_chunk=2,
        feature_scale=args.feature_scale,
        max_iterations=30000,
        low_memory=int(bool(opts.get("low_memory"))),
    )
    student = unet_3D_dt(feature_scale=args.feature_scale, n_classes=2, in_channels=1).to(device)
    # the pieces that speed.prepare_training puts together, one at a time
    passes = None
    if opts.get("low_memory"):
        predraw_dropout(student)
        passes = PredrawnPasses(keep_memory_around_teacher=bool(opts.get("malloc_teacher")))
    if opts.get("fused_norm"):
        fuse_norm_relu(student)
        keep_activations_as_sources(student)
    if opts.get("channels_last"):
        to_channels_last(student)
    student.train()
    method = UGMCL(student, cfg, passes=passes)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    batch = _batch(args, device)
    amp_dtype = None
    if opts.get("amp"):
        amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses, wall, cpu, sys_time, faults = [], [], [], [], []
    for step in range(args.warmup + args.iters):
        sync()
        t0, c0, r0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        losses.append(run_iteration(method, optimizer, scaler, batch, step, device.type, amp_dtype))
        sync()
        if step >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_time.append(r1.ru_stime - r0.ru_stime)
            faults.append(r1.ru_minflt - r0.ru_minflt)
    return {
        "name": name,
        "wall": sum(wall) / len(wall),
        "cpu": sum(cpu) / len(cpu),
        "sys": sum(sys_time) / len(sys_time),
        "faults": sum(faults) / len(faults),
        "peak": _peak_memory_bytes(device),
        "losses": losses,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "load": os.getloadavg()[0],
    }


def _run_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    for key in ("patch", "batch", "labeled_bs", "T", "feature_scale", "device", "iters", "warmup", "threads",
                "malloc_mmap_mb"):
        cmd += [f"--{key}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {name!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_problem_size_arguments(parser: argparse.ArgumentParser, patch: int = 96) -> None:
    """``--patch``, ``--batch``, ``--labeled_bs``, ``--T`` and ``--feature_scale``: the size of a UG-MCL iteration,
    shared by the training benchmarks (published size by default; ``patch`` sets the default patch side)."""
    parser.add_argument("--patch", type=int, default=patch, help=f"cubic patch side (multiple of 16). Default {patch}")
    parser.add_argument("--batch", type=int, default=4, help="batch size. Default 4")
    parser.add_argument("--labeled_bs", type=int, default=2, help="labelled rows in the batch. Default 2")
    parser.add_argument("--T", type=int, default=8, help="Monte-Carlo teacher passes. Default 8")
    parser.add_argument("--feature_scale", type=int, default=4, help="U-Net filters / feature_scale. Default 4")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_size_arguments(parser, patch=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]. Default auto")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations. Default 3")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first. Default 1")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--amp", action="store_true", help="add the +bf16 autocast configuration")
    parser.add_argument("--malloc_mmap_mb", type=int, default=1024,
                        help="+malloc: blocks of this many MB or more still get their own mmap. Default 1024")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help=f"configurations to run, in order (default: the fp32 ones but the +thp_ pairs); from {list(CONFIGS)} and 'all'",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run all configurations this many times, alternating, and keep each one's fastest run. Default 1",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest |loss - baseline loss| at the first iteration (fp32 configurations). Default 1e-5 on CPU, "
        "1e-3 on CUDA (cuDNN convolutions run in TF32 there, ~1e-3 relative, and pick algorithms per layout)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tolerance is None:
        args.tolerance = 1e-3 if args.device.startswith("cuda") else 1e-5
    if args.patch <= 0 or args.patch % 16:
        parser.error(f"--patch must be a positive multiple of 16, got {args.patch}")
    if not 1 <= args.labeled_bs < args.batch:
        parser.error(f"--labeled_bs must be in [1, --batch), got {args.labeled_bs} with --batch {args.batch}")
    if args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(
            f"--iters and --rounds must be >= 1, --warmup >= 0; got {args.iters}, {args.rounds}, {args.warmup}"
        )
    if not args.worker:
        from utils.device import check_device_argument

        check_device_argument(parser, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return 0
    names = [ALIASES.get(n, n) for n in (args.configs or [n for n in CONFIGS if n not in NOT_BY_DEFAULT])]
    if args.amp and "+bf16" not in names:
        names.append("+bf16")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)} or 'all'", file=sys.stderr)
        return 2
    if "baseline" in names:  # the reference runs first
        names.remove("baseline")
        names.insert(0, "baseline")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(args.rounds):  # alternate the configurations, so that load changes hit them all
        for name in names:
            print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            runs[name].append(_run_config(args, name))
    results = [min(runs[name], key=lambda r: r["wall"]) for name in names]  # the least disturbed run
    first = results[0]
    print(
        f"\nUG-MCL iteration, patch {args.patch}^3, batch {args.batch} ({args.labeled_bs} labelled), T = {args.T}, "
        f"feature_scale {args.feature_scale}, device {first['device']}, {first['threads']} threads, "
        f"{args.iters} timed + {args.warmup} warm-up iterations, best of {args.rounds} round(s); "
        f"1-min load average at the end of the kept runs {min(r['load'] for r in results):.1f}"
        f"-{max(r['load'] for r in results):.1f} (2 cores)\n"
    )
    base = results[0] if first["name"] == "baseline" else None
    print(
        "| configuration | s/iter (wall) | CPU s/iter (of which kernel) | page faults/iter | peak memory "
        "| speed-up (wall / CPU) | memory | loss diff, 1st iter | max loss diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for r in results:
        if base is None:
            speed = memory = first_diff = max_diff = "-"
        else:
            speed = f"{base['wall'] / r['wall']:.2f}x / {base['cpu'] / r['cpu']:.2f}x"
            memory = f"{r['peak'] / base['peak']:.0%}"
            diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"])]
            first_diff, max_diff = f"{diffs[0]:.1e}", f"{max(diffs):.1e}"
            if not CONFIGS[r["name"]].get("amp") and diffs[0] > args.tolerance:
                failed = True
                first_diff += " (!)"
        print(
            f"| {r['name']} | {r['wall']:.2f} | {r['cpu']:.2f} ({r['sys']:.2f}) | {r['faults'] / 1e3:.0f}k "
            f"| {r['peak'] / 2**30:.2f} GB | {speed} | {memory} | {first_diff} | {max_diff} |"
        )
    print("\nlosses per iteration:")
    for r in results:
        print(f"  {r['name']}: {', '.join(f'{v:.7f}' for v in r['losses'])}")
    if failed:
        print(
            f"an fp32 configuration's first loss differs from the baseline's by more than {args.tolerance}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
