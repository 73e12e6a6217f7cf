"""The speed options through the training loop: each gives the plain run's losses (bit for bit where the maths is
the same, to float rounding with --fast_network), and the CLI's speed group."""

from __future__ import annotations

import contextlib
import platform
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import speed
import speed.compile as compile_support
import speed.passes as passes_module
from engine.config import TrainConfig
from engine.trainer import logged_losses, train
from speed.compile import CompileError
from synthetic_h5 import tiny_config

CODE = Path(__file__).resolve().parents[2] / "code"


def with_speed(cfg: TrainConfig, **options) -> TrainConfig:
    return replace(cfg, speed=replace(cfg.speed, **options))


def test_fast_network_option_trains_and_saves_a_plain_loadable_state_dict(tiny_root: Path, tmp_path: Path) -> None:
    from networks.net_factory_3d import net_factory_3d

    cfg = tiny_config(tiny_root, max_iterations=2, val_interval=2)
    train(cfg, model_dir=tmp_path / "plain", progress=False)
    train(with_speed(cfg, fast_network=True), model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    plain = net_factory_3d("unet_3D_dt", in_chns=1, class_num=2, feature_scale=16)
    plain.load_state_dict(torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True))
    log = (out / "log.txt").read_text()
    assert '"fast_network": true' in log and "iteration 2 : loss" in log
    assert "chosen: fast network: fused InstanceNorm+ReLU, channels-last" in log
    plain_log = (tmp_path / "plain" / "tiny_2" / "unet_3D_dt" / "log.txt").read_text()
    assert logged_losses(log) == pytest.approx(logged_losses(plain_log), rel=1e-4)  # same maths, float rounding


def test_keep_freed_memory_is_2_by_default_and_can_be_switched_off(tiny_root: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(CODE))
    from train_UGMCL_3D import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).speed.keep_freed_memory == 2
    for value in (0, 1):
        cfg = config_from_args(build_parser().parse_args(["--keep_freed_memory", str(value)]))
        assert cfg.speed.keep_freed_memory == value
    train(tiny_config(tiny_root, max_iterations=1, keep_freed_memory=0), model_dir=tmp_path / "off", progress=False)
    assert "glibc keeps freed memory" not in (tmp_path / "off" / "tiny_2" / "unet_3D_dt" / "log.txt").read_text()
    train(tiny_config(tiny_root, max_iterations=1, keep_freed_memory=1), model_dir=tmp_path / "on", progress=False)
    log = (tmp_path / "on" / "tiny_2" / "unet_3D_dt" / "log.txt").read_text()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert f"glibc keeps freed memory for reuse: {'yes' if glibc else 'not available here'}" in log


def test_keep_freed_memory_2_keeps_it_around_the_teacher_passes_and_validations_only(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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

    monkeypatch.setattr(speed, "keeping_freed_memory", recorder)  # around the validations
    monkeypatch.setattr(passes_module, "keeping_freed_memory", recorder)  # around the teacher's passes
    monkeypatch.setattr(trainer, "validate", validate)
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: pytest.fail("mode 2 must not keep freed memory for good"))
    train(tiny_config(tiny_root, max_iterations=2, val_interval=2, keep_freed_memory=2), model_dir=tmp_path,
          progress=False)
    assert events == ["kept", "kept", "kept", "validation inside"]  # two steps' teacher passes, the validation
    with pytest.raises(ValueError, match=r"--keep_freed_memory must be one of \(0, 1, 2\), got 3"):
        tiny_config(tiny_root, keep_freed_memory=3)
    with pytest.raises(ValueError, match="--compile 1 and --fast_network do not go together"):
        tiny_config(tiny_root, compile=True, fast_network=True)


@pytest.mark.parametrize("low_memory", [0, 1])
def test_compile_option_runs_both_networks_through_dynamo_with_the_same_losses(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, low_memory: int
) -> None:
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(CODE))
    from train_UGMCL_3D import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).speed.compile is False
    assert config_from_args(build_parser().parse_args(["--compile", "1"])).speed.compile is True
    # Dynamo's tracing without code generation: the graphs run the same aten ops, so the random stream, the losses
    # and the weights must stay those of the plain run, while every forward goes through a captured graph.
    monkeypatch.setattr(compile_support, "COMPILE_BACKEND", "eager")
    cfg = tiny_config(tiny_root, max_iterations=3, val_interval=3, save_interval=3, low_memory=low_memory)
    torch._dynamo.reset()
    counters.clear()
    train(cfg, model_dir=tmp_path / "plain", progress=False)
    assert not counters["stats"]["unique_graphs"]
    train(with_speed(cfg, compile=True), model_dir=tmp_path / "compiled", progress=False)
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
    assert "torch.compile (eager): 2 network(s) compile on first use" in log  # student and teacher
    assert "--compile 1 on CPU: compiling takes minutes and brings no speed-up there" in log
    torch._dynamo.reset()


def test_compile_on_a_gpu_without_triton_or_older_than_volta_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(compile_support, "COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla K80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (3, 7))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(CompileError, match="needs Triton, which is not installed"):
        compile_support.check_compile_support(cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    with pytest.raises(CompileError, match=r"compute capability 7.0 or newer \(Triton\); Tesla K80 is 3.7"):
        compile_support.check_compile_support(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    compile_support.check_compile_support(cuda)  # a Hopper GPU with Triton: accepted
    monkeypatch.setattr(compile_support.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    compile_support.check_compile_support(torch.device("cpu"))  # CPU with a C++ compiler on PATH: accepted
    monkeypatch.setattr(compile_support.shutil, "which", lambda name: None)
    with pytest.raises(CompileError, match="needs a C\\+\\+ compiler"):
        compile_support.check_compile_support(torch.device("cpu"))




@pytest.mark.parametrize(
    "method, model",
    [("supervised", "unet_3D"), ("mean_teacher", "unet_3D"), ("uamt", "unet_3D"), ("entropy_min", "unet_3D"),
     ("dtc", "vnet_dt"), ("urpc", "unet_3D_ds")],
)
def test_compile_option_traces_every_baseline_without_graph_breaks(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, model: str
) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compile_support, "COMPILE_BACKEND", "eager")
    cfg = tiny_config(tiny_root, method=method, model=model, max_iterations=2, val_interval=2, save_interval=2)
    losses = []
    for compiled in (0, 1):
        torch._dynamo.reset()
        counters.clear()
        summary = train(with_speed(cfg, compile=bool(compiled)), model_dir=tmp_path / str(compiled), progress=False)
        log = (Path(summary["out_dir"]) / "log.txt").read_text()
        losses.append(logged_losses(log))
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert len(losses[0]) == 2 and losses[1] == losses[0]
    torch._dynamo.reset()
