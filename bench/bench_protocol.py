"""Time training iterations at the size of a mini-study preset: the released-like path against the speed door.

Run from the repository root::

    python bench/bench_protocol.py                                  # preset brats: V-Net / 8, 48^3, batch 4, T = 4
    python bench/bench_protocol.py --preset la --methods supervised ugmcl mcnet_plus bcp
    python bench/bench_protocol.py --threads 2 --profile            # plus the top operators of the fast path

The network, patch, width, batch, T and teacher chunking come from ``scripts/mini_study.py``'s preset, so the table
shows what one iteration of that protocol costs. Every (method, configuration) runs in a fresh subprocess on the same
seeded batch, weights and random stream, ``--warmup`` untimed then ``--iters`` timed iterations of the training
loop (the method's ``training_step``, backward, SGD step, EMA update):

============  ===========================================================================================
``released``  plain modules, contiguous layout, the released order (student first, ``low_memory=0``), teacher
              passes two per forward (``mc_chunk=2``), glibc's default allocator behaviour
``fast``      what training uses on CPU by default with ``--fast_network``: ``speed.prepare_training`` with
              channels-last and fused norms where the network has them, dropout masks drawn ahead, the
              teacher's passes first and all in one forward (the preset's ``mc_chunk``), freed memory kept during
              the teacher's passes (``--keep_freed_memory 2``)
============  ===========================================================================================

Columns: wall and CPU seconds per iteration, peak RSS (includes ~0.35 GB of Python and torch), the speed-up over
``released``, and the largest difference of the per-iteration losses from ``released`` (the same maths, other
rounding and another random order, so not bit for bit). With ``--profile`` the fast configuration of each method
prints its most expensive operators (self CPU time) for one more iteration.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

CONFIGS = ("released", "fast")


def worker(args: argparse.Namespace, method_name: str, config: str) -> dict[str, Any]:
    """Run ``config`` of ``method_name`` in this process; return its timings, memory and losses."""
    import torch
    from bench_train import fixed_batch, run_iteration
    from mini_study import FIXED_NETWORKS, PRESETS

    import speed
    from engine.config import TrainConfig
    from methods import METHODS
    from networks.net_factory_3d import net_factory_3d, width_kwargs

    preset = PRESETS[args.preset].options
    fast = config == "fast"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    model = FIXED_NETWORKS.get(method_name, preset["model"])
    patch = tuple(preset["patch_size"])
    cfg = TrainConfig(
        model=model, method=method_name, variant="paper" if method_name == "ugmcl" else "released",
        patch_size=patch, batch_size=preset["batch_size"], labeled_bs=preset["labeled_bs"],
        mc_passes=preset["mc_passes"], mc_chunk=preset["mc_chunk"] if fast else 2, feature_scale=preset["feature_scale"],
        max_iterations=preset["max_iterations"], low_memory=int(fast),
        bcp_pretrain_iterations=0,  # time BCP's self-training stage, the expensive one
    )
    student = net_factory_3d(model, 1, 2, **width_kwargs(model, cfg.feature_scale))
    options = speed.SpeedOptions(fast_network=fast, keep_freed_memory=2 if fast else 0)
    training = speed.prepare_training(student, options, torch.device("cpu"))
    student.train()
    method = METHODS[method_name](student, cfg, passes=training.passes)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batch = fixed_batch(patch, cfg.batch_size, cfg.labeled_bs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, wall, cpu = [], [], []
    for step in range(args.warmup + args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(run_iteration(method, optimizer, scaler, batch, step, "cpu"))
        if step >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    table = ""
    if args.profile and fast:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_iteration(method, optimizer, scaler, batch, args.warmup + args.iters, "cpu")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    return {
        "method": method_name, "config": config, "wall": sum(wall) / len(wall), "cpu": sum(cpu) / len(cpu),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "losses": losses,
        "threads": torch.get_num_threads(), "profile": table,
    }


def _run(args: argparse.Namespace, method_name: str, config: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method_name, config, "--preset", args.preset,
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--rows", str(args.rows)] + (["--profile"] if args.profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{method_name} / {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the worker results, ``released`` first per method."""
    lines = ["| method | configuration | s / iteration | CPU s / iteration | speed-up | peak RSS | max loss diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {r["method"]: r for r in rows if r["config"] == "released"}
    for r in rows:
        ref = base.get(r["method"])
        speedup = f"{ref['wall'] / r['wall']:.2f}x" if ref else "n/a"
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) if ref else float("nan")
        lines.append(f"| {r['method']} | {r['config']} | {r['wall']:.2f} | {r['cpu']:.2f} | {speedup} | "
                     f"{r['peak'] / 2**30:.2f} GiB | {diff:.2e} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from mini_study import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="brats", help="size of this preset (default brats)")
    parser.add_argument("--methods", nargs="+", default=["supervised", "ugmcl"], help="default: supervised ugmcl")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations. Default 3")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first. Default 2")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads. Default 1 (as the study)")
    parser.add_argument("--profile", action="store_true", help="print the fast path's top operators")
    parser.add_argument("--rows", type=int, default=15, help="operators per profile table. Default 15")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, *args.worker)))
        return 0
    rows = []
    for method_name in args.methods:
        for config in CONFIGS:
            rows.append(_run(args, method_name, config))
            print(f"# {method_name} / {config}: {rows[-1]['wall']:.2f} s per iteration", file=sys.stderr, flush=True)
    print(f"preset {args.preset}, {rows[0]['threads']} thread(s), {args.warmup} warm-up + {args.iters} timed "
          f"iterations, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(format_table(rows))
    for r in rows:
        if r["profile"]:
            print(f"\n{r['method']} / fast, one iteration:\n{r['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
