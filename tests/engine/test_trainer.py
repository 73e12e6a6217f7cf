"""The shared training loop: outputs, exact resume, learning, and the bad-input messages."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import TrainConfig
from engine.trainer import TrainingError, logged_losses, train
from synthetic_h5 import write_synthetic_h5_dataset

CODE = Path(__file__).resolve().parents[2] / "code"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_synthetic_h5_dataset(root, n_cases=7, shape=(36, 36, 34), seed=3, n_val=1, n_test=1)
    return root


def tiny_config(root: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        root_path=str(root), exp="tiny", labeled_num=2, patch_size=(32, 32, 32), feature_scale=16,
        max_iterations=4, batch_size=2, labeled_bs=1, mc_passes=3, val_interval=2, save_interval=2,
        num_workers=0, device="cpu", stride_xy=16, stride_z=16,
    )
    return replace(cfg, **overrides)


def test_a_short_run_writes_every_output(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root)
    summary = train(cfg, model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    assert Path(summary["out_dir"]) == out
    assert (out / "log.txt").read_text().count("iteration ") >= 4
    assert "glibc keeps freed memory for reuse during the teacher's passes" in (out / "log.txt").read_text()  # CPU
    assert json.loads((out / "config.json").read_text())["max_iterations"] == 4
    assert list((out / "log").glob("events.out.tfevents.*"))
    best = torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values())  # a plain state_dict, the published format
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
        ({"stride_xy": 48}, "or the sliding windows leave gaps"),
        ({"labeled_num": 50}, "larger than the training list"),
        ({"root_path": "/nonexistent/BraTS"}, "make demo"),
        ({"compile": 1, "fast_network": True}, "--compile 1 and --fast_network do not go together"),
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


def test_fast_network_option_trains_and_saves_a_plain_loadable_state_dict(tiny_root: Path, tmp_path: Path) -> None:
    from networks.net_factory_3d import net_factory_3d

    cfg = tiny_config(tiny_root, max_iterations=2, val_interval=2, fast_network=True)
    train(cfg, model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    plain = net_factory_3d("unet_3D_dt", in_chns=1, class_num=2, feature_scale=16)
    plain.load_state_dict(torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True))
    log = (out / "log.txt").read_text()
    assert '"fast_network": true' in log and "iteration 2 : loss" in log


def test_keep_freed_memory_is_2_by_default_and_can_be_switched_off(tiny_root: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(CODE))
    from train_UGMCL_3D import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).keep_freed_memory == 2
    for value in (0, 1):
        cfg = config_from_args(build_parser().parse_args(["--keep_freed_memory", str(value)]))
        assert cfg.keep_freed_memory == value
    train(tiny_config(tiny_root, max_iterations=1, keep_freed_memory=0), model_dir=tmp_path / "off", progress=False)
    assert "glibc keeps freed memory" not in (tmp_path / "off" / "tiny_2" / "unet_3D_dt" / "log.txt").read_text()
    train(tiny_config(tiny_root, max_iterations=1, keep_freed_memory=1), model_dir=tmp_path / "on", progress=False)
    log = (tmp_path / "on" / "tiny_2" / "unet_3D_dt" / "log.txt").read_text()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert f"glibc keeps freed memory for reuse: {'yes' if glibc else 'not available here'}" in log


def test_keep_freed_memory_2_keeps_it_around_the_teacher_passes_and_validations_only(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import engine.trainer as trainer

    events: list[str] = []
    inside = [False]

    @contextlib.contextmanager
    def recorder():
        events.append("kept")
        inside[0] = True
        try:
            yield True
        finally:
            inside[0] = False

    real_validate = trainer.validate

    def validate(*args, **kwargs):
        events.append("validation inside" if inside[0] else "validation outside")
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "keeping_freed_memory", recorder)
    monkeypatch.setattr(trainer, "validate", validate)
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: pytest.fail("mode 2 must not keep freed memory for good"))
    train(tiny_config(tiny_root, max_iterations=2, val_interval=2, keep_freed_memory=2), model_dir=tmp_path,
          progress=False)
    assert events == ["kept", "kept", "kept", "validation inside"]  # two steps' teacher passes, the validation
    with pytest.raises(trainer.TrainingError, match="--keep_freed_memory must be 0, 1 or 2, got 3"):
        train(tiny_config(tiny_root, keep_freed_memory=3), model_dir=tmp_path, progress=False)


@pytest.mark.parametrize("low_memory", [0, 1])
def test_compile_option_runs_both_networks_through_dynamo_with_the_same_losses(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, low_memory: int
) -> None:
    from torch._dynamo.utils import counters

    import engine.trainer as trainer

    sys.path.insert(0, str(CODE))
    from train_UGMCL_3D import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).compile == 0
    assert config_from_args(build_parser().parse_args(["--compile", "1"])).compile == 1
    # Dynamo's tracing without code generation: the graphs run the same aten ops, so the random stream, the losses
    # and the weights must stay those of the plain run, while every forward goes through a captured graph.
    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "eager")
    cfg = tiny_config(tiny_root, max_iterations=3, val_interval=3, save_interval=3, low_memory=low_memory)
    torch._dynamo.reset()
    counters.clear()
    train(cfg, model_dir=tmp_path / "plain", progress=False)
    assert not counters["stats"]["unique_graphs"]
    train(replace(cfg, compile=1), model_dir=tmp_path / "compiled", progress=False)
    # student (train step, image grid, validation) and teacher (noisy pass, Monte-Carlo passes): one graph per
    # network, mode and shape, and no graph breaks (low_memory's pre-drawn dropout masks included)
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])

    def run(name: str) -> tuple[list[float], dict[str, torch.Tensor], str]:
        out = tmp_path / name / "tiny_2" / "unet_3D_dt"
        log = (out / "log.txt").read_text()
        return logged_losses(log), torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True), log

    plain_losses, plain_weights, _ = run("plain")
    losses, weights, log = run("compiled")
    assert len(losses) == 3 and losses == plain_losses
    assert list(weights) == list(plain_weights)  # the published keys: no "_orig_mod." prefix
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    assert "torch.compile (eager): student and teacher forwards" in log
    assert "--compile 1 on CPU: no speed-up was measured" in log
    torch._dynamo.reset()


def test_compile_on_a_gpu_without_triton_or_older_than_volta_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import engine.trainer as trainer

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla K80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (3, 7))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(TrainingError, match="needs Triton, which is not installed"):
        trainer.check_compile_support(cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    with pytest.raises(TrainingError, match=r"compute capability 7.0 or newer \(Triton\); Tesla K80 is 3.7"):
        trainer.check_compile_support(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    trainer.check_compile_support(cuda)  # a Hopper GPU with Triton: accepted
    monkeypatch.setattr(trainer.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    trainer.check_compile_support(torch.device("cpu"))  # CPU with a C++ compiler on PATH: accepted
    monkeypatch.setattr(trainer.shutil, "which", lambda name: None)
    with pytest.raises(TrainingError, match="needs a C\\+\\+ compiler"):
        trainer.check_compile_support(torch.device("cpu"))


@pytest.mark.parametrize(
    "method, model",
    [("supervised", "unet_3D"), ("mean_teacher", "unet_3D"), ("uamt", "unet_3D"), ("entropy_min", "unet_3D"),
     ("dtc", "vnet_dt"), ("urpc", "unet_3D_ds")],
)
def test_compile_option_traces_every_baseline_without_graph_breaks(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, model: str
) -> None:
    from torch._dynamo.utils import counters

    import engine.trainer as trainer

    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "eager")
    cfg = tiny_config(tiny_root, method=method, model=model, max_iterations=2, val_interval=2, save_interval=2)
    losses = []
    for compiled in (0, 1):
        torch._dynamo.reset()
        counters.clear()
        summary = train(replace(cfg, compile=compiled), model_dir=tmp_path / str(compiled), progress=False)
        log = (Path(summary["out_dir"]) / "log.txt").read_text()
        losses.append(logged_losses(log))
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert len(losses[0]) == 2 and losses[1] == losses[0]
    torch._dynamo.reset()
