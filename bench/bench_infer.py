"""Time sliding-window prediction of whole volumes with ``unet_3D_dt``: plain against the fast path.

Run from the repository root::

    python bench/bench_infer.py                               # 128x128x96 and 144x176x144, patch 96, stride 64
    python bench/bench_infer.py --shapes 128 128 96 --repeats 3
    python bench/bench_infer.py --checkpoint ../model/.../unet_3D_dt_best_model.pth --malloc
    python bench/bench_infer.py --blends uniform --repeats 3 --both_allocators   # default and --malloc, one table
    python bench/bench_infer.py --h5 ../data/BraTS2019/data/<case>.h5 --checkpoint .../unet_3D_dt_best_model.pth
    python bench/bench_infer.py --blends uniform --original_code ../UG-MCL/code   # and the released code itself

For each volume shape, every combination of blending (uniform as released, gaussian), windows per forward pass
(``--sw_batch``, default 1 and 4) and network path is timed with ``utils.sliding_window.predict_volume_labels``:

* ``plain``: the network as released (contiguous layout, ``InstanceNorm3d`` + ``ReLU`` modules);
* ``fast``: ``speed.make_fast`` on a copy: channels-last with the fused norm + ReLU step;
* ``fast+amp`` (with ``--amp``): ``fast`` under bf16 autocast (fp16 on GPUs without bf16).

``--device cuda`` runs on the GPU (with cuDNN autotuning, after one warm-up per path and batch size).

The volume is a seeded synthetic head: a smooth ellipsoid "brain" with a brighter blob and noise, zero outside;
``--h5`` takes preprocessed cases instead (the ``image`` of each ``<case>.h5``, as ``test_3D_dt.py`` reads it).
The network is ``unet_3D_dt`` with seeded random weights, or ``--checkpoint`` (a plain ``state_dict``). Each row
gives the median wall and CPU seconds per volume over ``--repeats`` runs (after one warm-up), the speed-up over
the plain path with the same blending and batch and over the released algorithm (plain, uniform, one window at a
time), and the share of voxels whose label equals the released algorithm's. ``--malloc`` / ``--thp`` apply the
allocator settings of ``bench_train.py``'s ``+malloc`` / ``+thp`` rows to the whole run; ``--both_allocators`` runs
every row with glibc's default and then with ``--malloc``, in two fresh processes, and prints one table whose
speed-ups are against the default allocator's plain path. A random network leaves many voxels at
probability ~0.5, where float rounding can flip a label; a trained one far fewer.

``--original_code DIR`` (the released repository's ``code/`` folder) also times the released code itself on the same
volumes and weights: its ``test_3D_util.test_single_case`` (one window at a time, uniform averaging), in a fresh
process started through ``bench/run_original_code.py`` (glibc's default allocator; with ``--both_allocators``, in
the default run only). Its row is named ``original``; its label column compares it with our plain path, and a line
under the table gives the fastest row's speed-up over it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed.allocator import keep_freed_memory  # noqa: E402
from utils.device import check_device_argument  # noqa: E402


def make_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A (D, H, W) float32 z-scored "head": ellipsoid brain, a bright blob, Gaussian noise, zero background."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*(np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape), indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    centre = rng.uniform(-0.3, 0.3, size=3).astype(np.float32)
    blob = np.exp(-(((grid - centre[:, None, None, None]) ** 2).sum(0)) / 0.02)
    volume = (0.5 * grid[0] + 2.5 * blob + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    volume[~brain] = 0.0
    inside = volume[brain]
    volume[brain] = (inside - inside.mean()) / inside.std()
    return volume


def read_h5_image(path: str) -> np.ndarray:
    """The (D, H, W) float32 ``image`` of a preprocessed ``<case>.h5``; ValueError naming the file otherwise."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            image = np.asarray(h5["image"][()], dtype=np.float32)
    except (OSError, KeyError) as err:
        raise ValueError(f"{path}: not a preprocessed case with an 'image' dataset ({err})") from None
    if image.ndim != 3:
        raise ValueError(f"{path}: 'image' has shape {image.shape}; this bench takes one channel, (D, H, W)")
    return image


# Written next to the volumes and run in the released code/ folder by run_original_code.py (``--original_code``).
_ORIGINAL_DRIVER = """
import json, statistics, sys, time
import numpy as np
import torch
from networks.net_factory_3d import net_factory_3d
from test_3D_util import test_single_case

spec = json.load(open(sys.argv[1]))
net = net_factory_3d(net_type="unet_3D_dt", in_chns=1, class_num=2)
net.load_state_dict(torch.load(spec["weights"], map_location="cpu"))  # copied to the net's device
net.eval()
patch, stride, results = [spec["patch"]] * 3, spec["stride"], []
for path in spec["volumes"]:
    image = np.load(path)
    test_single_case(net, image, stride, stride, patch, num_classes=2)  # warm-up, as for the other rows
    walls, cpus = [], []
    for _ in range(spec["repeats"]):
        wall, cpu = time.perf_counter(), time.process_time()
        labels = test_single_case(net, image, stride, stride, patch, num_classes=2)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    np.save(path + ".labels.npy", labels.astype(np.uint8))
    results.append({"wall": statistics.median(walls), "cpu": statistics.median(cpus)})
json.dump(results, open(spec["out"], "w"))
"""


def time_original_code(
    code_dir: Path, state_dict: dict, volumes: list[np.ndarray], patch: int, stride: int, repeats: int
) -> list[tuple[float, float, np.ndarray]]:
    """``(wall, cpu, labels)`` per volume of the released ``test_single_case`` (median of ``repeats`` after a warm-up).

    Runs in a fresh process in ``code_dir`` (its packages share our package names), through
    ``run_original_code.py``. Raises RuntimeError with the end of its stderr if it fails.
    """
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_infer_original_") as tmp:
        work = Path(tmp)
        paths = []
        for i, volume in enumerate(volumes):
            paths.append(str(work / f"volume{i}.npy"))
            np.save(paths[-1], volume)
        torch.save(state_dict, work / "weights.pth")
        (work / "driver.py").write_text(_ORIGINAL_DRIVER)
        spec = {"weights": str(work / "weights.pth"), "volumes": paths, "patch": patch, "stride": stride,
                "repeats": repeats, "out": str(work / "times.json")}
        (work / "spec.json").write_text(json.dumps(spec))
        launcher = Path(__file__).resolve().parent / "run_original_code.py"
        proc = subprocess.run([sys.executable, str(launcher), str(work / "driver.py"), str(work / "spec.json")],
                              cwd=code_dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the released code failed:\n{proc.stderr[-3000:]}")
        times = json.loads((work / "times.json").read_text())
        return [(t["wall"], t["cpu"], np.load(p + ".labels.npy")) for t, p in zip(times, paths)]


def original_code_summary(rows: list, allocators: list[str] | None = None) -> list[str]:
    """One line per volume with an ``original`` row: the fastest other row's speed-up over the released code."""
    lines = []
    for volume in dict.fromkeys(row[0] for row in rows):
        mine = [(i, row) for i, row in enumerate(rows) if row[0] == volume]
        original = next((row for _, row in mine if row[3] == "original"), None)
        if original is None:
            continue
        i, best = min(((i, row) for i, row in mine if row[3] != "original"), key=lambda item: item[1][4])
        where = f", {allocators[i]} allocator" if allocators else ""
        lines.append(
            f"{volume}: the released code {original[4]:.2f} s; fastest here {best[3]}, {best[2]} windows{where}, "
            f"{best[4]:.2f} s: {original[4] / best[4]:.2f}x faster than the released code, whose labels differ "
            f"from our plain path's on {original[8]} voxels"
        )
    return lines


def _time(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out  # type: ignore[return-value]


def _print_table(rows: list, allocators: list[str] | None = None) -> None:
    """The Markdown table of the timed rows; with ``allocators``, a column naming each row's allocator."""
    allocator_column = "| allocator " if allocators else ""
    same = "same allocator, blend, batch" if allocators else "same blend, batch"
    released = "default allocator, plain, uniform, 1" if allocators else "plain, uniform, 1"
    print(
        f"| volume {allocator_column}| blend | sw_batch | network | s/volume (wall) | CPU s | speed-up vs plain ({same}) "
        f"| vs released ({released}) | labels = released |"
    )
    print("|---" * (10 if allocators else 9) + "|")
    for i, (volume, blend, sw_batch, path, wall, cpu, speed, agreement, differ) in enumerate(rows):
        allocator = f"| {allocators[i]} " if allocators else ""
        print(
            f"| {volume} {allocator}| {blend} | {sw_batch} | {path} | {wall:.2f} | {cpu:.2f} "
            f"| {speed[0]:.2f}x | {speed[1]:.2f}x | {agreement:.6%} ({differ} differ) |"
        )


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` or ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _run_both_allocators(argv: list[str]) -> int:
    """``--both_allocators``: this benchmark in two fresh processes (glibc's default, then ``--malloc``), one table."""
    argv = [a for a in argv if a != "--both_allocators"] + ["--json"]
    results = {}
    without_original = without_option(argv, "--original_code")  # the released code runs once, with the default
    for name, run_argv, extra in (("default", argv, []), ("kept", without_original, ["--malloc"])):
        print(f"allocator {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *run_argv, *extra],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"the {name} run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    if results["default"]["references"] != results["kept"]["references"]:
        print("the two runs' plain labels differ; their label columns are not comparable", file=sys.stderr)
        return 1
    released: dict[str, float] = {}
    rows, allocators = [], []
    for name in ("default", "kept"):
        for volume, blend, sw_batch, path, wall, cpu, speed, agreement, differ in results[name]["rows"]:
            released.setdefault(volume, wall)  # the default run's first row of each volume comes first
            speed = (speed[0], released[volume] / wall)
            rows.append((volume, blend, sw_batch, path, wall, cpu, speed, agreement, differ))
            allocators.append(name)
    print(f"\n{results['default']['title']}; every row with glibc's default allocator, then in a second process with "
          "glibc keeping freed memory (--malloc)\n")
    _print_table(rows, allocators)
    for line in original_code_summary(rows, allocators):
        print(f"\n{line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        type=int,
        nargs="+",
        default=[128, 128, 96, 144, 176, 144],
        help="volume shapes, three ints each. Default 128 128 96 144 176 144",
    )
    parser.add_argument(
        "--h5", nargs="+", default=None, metavar="CASE_H5",
        help="preprocessed cases (<case>.h5) to predict instead of the synthetic --shapes",
    )
    parser.add_argument("--patch", type=int, default=96, help="cubic patch side. Default 96")
    parser.add_argument("--stride", type=int, default=64, help="stride on all axes. Default 64")
    parser.add_argument("--sw_batch", type=int, nargs="+", default=[1, 4], help="windows per pass. Default 1 4")
    parser.add_argument("--blends", nargs="+", default=["uniform", "gaussian"], choices=["uniform", "gaussian"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (median). Default 1")
    parser.add_argument("--checkpoint", default=None, help="a unet_3D_dt state_dict (.pth); default random weights")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--malloc", action="store_true", help="glibc keeps freed memory (bench_train's +malloc)")
    parser.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 (bench_train's +thp)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto. Default cpu")
    parser.add_argument("--amp", action="store_true", help="add a fast+amp row (bf16/fp16 autocast)")
    parser.add_argument(
        "--both_allocators",
        action="store_true",
        help="run every row twice, in two fresh processes: glibc's default, then --malloc; one table, speed-ups "
        "against the default plain path (the released way)",
    )
    parser.add_argument("--original_code", type=Path, default=None,
                        help="the released repository's code/ folder: also time its test_single_case")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # rows as JSON (--both_allocators)
    args = parser.parse_args(argv)
    if args.both_allocators and (args.malloc or args.thp):
        parser.error("--both_allocators sets the allocator itself; drop --malloc / --thp")
    if args.original_code is not None and not (args.original_code / "test_3D_util.py").is_file():
        parser.error(f"--original_code {args.original_code}: no test_3D_util.py there")
    if len(args.shapes) % 3:
        parser.error(f"--shapes takes three ints per volume, got {len(args.shapes)} ints")
    volumes: list[tuple[str, np.ndarray]] = []
    for path in args.h5 or []:
        try:
            image = read_h5_image(path)
        except ValueError as err:
            parser.error(str(err))
        volumes.append((f"{Path(path).stem} {'x'.join(map(str, image.shape))}", image))
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch at its first allocation
    check_device_argument(parser, args.device)
    if args.both_allocators:
        return _run_both_allocators(list(sys.argv[1:] if argv is None else argv))
    if args.malloc and not keep_freed_memory():
        print("mallopt is not available here; --malloc ignored", file=sys.stderr)

    import copy

    import torch

    from networks.unet_3D import unet_3D_dt
    from speed import make_fast
    from utils.device import get_device
    from utils.sliding_window import predict_volume_labels

    device = get_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed window shapes: let cuDNN pick its fastest kernels once

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = unet_3D_dt(n_classes=2, in_channels=1)
    if args.checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    net.eval()

    net.to(device)
    fast_net = make_fast(copy.deepcopy(net))  # on any device here: the door itself keeps CUDA plain
    paths = ["plain", "fast"] + (["fast+amp"] if args.amp else [])
    if not volumes:
        for i in range(0, len(args.shapes), 3):
            shape = tuple(args.shapes[i : i + 3])
            volumes.append(("x".join(map(str, shape)), make_volume(shape)))
    rows = []
    references: list[np.ndarray] = []  # per volume: the labels of the released algorithm (plain, uniform, 1)
    released_times: list[float] = []
    for name, volume in volumes:

        def run(blend: str, sw_batch: int, path: str, volume: np.ndarray = volume) -> np.ndarray:
            return predict_volume_labels(
                net if path == "plain" else fast_net, volume, (args.patch,) * 3, args.stride, args.stride,
                blend=blend, batch_size=sw_batch, amp=path == "fast+amp", device=device,
            )

        # warm-up: oneDNN primitives and the allocator (one run); on CUDA cuDNN autotunes each shape and dtype
        for path in paths if device.type == "cuda" else ["fast"]:
            for sw_batch in args.sw_batch if device.type == "cuda" else args.sw_batch[:1]:
                run("uniform", sw_batch, path)
        reference = None
        released_time = 0.0
        plain_time: dict[tuple[str, int], float] = {}
        for blend in args.blends:
            for sw_batch in args.sw_batch:
                for path in paths:
                    fast = path != "plain"
                    wall, cpu, labels = _time(lambda b=blend, n=sw_batch, f=path: run(b, n, f), args.repeats)
                    if reference is None:  # plain, uniform, first batch size: the released algorithm
                        reference, released_time = labels, wall
                        references.append(reference)
                        released_times.append(wall)
                    if not fast:
                        plain_time[(blend, sw_batch)] = wall
                    agreement = float((labels == reference).mean())
                    speed = (plain_time[(blend, sw_batch)] / wall, released_time / wall)
                    rows.append(
                        (
                            name,
                            blend,
                            sw_batch,
                            path,
                            wall,
                            cpu,
                            speed,
                            agreement,
                            int((labels != reference).sum()),
                        )
                    )
                    print(
                        f"  {name} {blend} sw_batch {sw_batch} {path}: {wall:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    if args.original_code is not None:
        print("  the released code ...", file=sys.stderr, flush=True)
        state = {key: value.detach().cpu() for key, value in net.state_dict().items()}
        try:
            timed = time_original_code(
                args.original_code, state, [v for _, v in volumes], args.patch, args.stride, args.repeats
            )
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        grouped = []  # each volume's rows, then its "original" row
        for (name, _), reference, released, (wall, cpu, labels) in zip(volumes, references, released_times, timed):
            grouped += [row for row in rows if row[0] == name]
            speed = (released / wall, released / wall)
            agreement, differ = float((labels == reference).mean()), int((labels != reference).sum())
            grouped.append((name, "uniform", 1, "original", wall, cpu, speed, agreement, differ))
        rows = grouped

    title = (
        f"Sliding window, patch {args.patch}^3, stride {args.stride}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}, "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights (seed 0)'}"
        f"{', malloc keeps freed memory' if args.malloc else ''}{', THP allocations' if args.thp else ''}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        digests = [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in references]
        print(json.dumps({"title": title, "references": digests, "rows": rows}))
        return 0
    print(f"\n{title}\n")
    _print_table(rows)
    for line in original_code_summary(rows):
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
