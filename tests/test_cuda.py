"""Checks that need a CUDA device (marker ``cuda``, skipped without one): ``pytest -m cuda``.

The CPU suite covers the same code; these check that it also runs on a GPU, with the same results where the
arithmetic is the same (fp32 with TF32 off), and sane ones under bf16/fp16 autocast.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from engine.trainer import logged_losses, train
from methods.base import Batch
from methods.ugmcl import UGMCL, ugmcl_objective
from networks.unet_3D import unet_3D_dt
from speed import SpeedOptions, make_fast, prepare_training
from speed.fused_norm import instance_norm_relu
from synthetic_h5 import write_synthetic_h5_dataset
from utils.sliding_window import predict_volume_labels
from utils.uncertainty import entropy_of_mean_softmax

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CL = torch.channels_last_3d


@pytest.fixture
def true_fp32():
    """cuDNN convolutions and matmuls default to TF32 (~1e-3 relative error): switch it off for exact comparisons."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("fast", [False, True])
def test_unet_3D_dt_on_cuda_reproduces_the_golden_outputs(golden_dir: Path, true_fp32, fast: bool) -> None:
    golden = torch.load(golden_dir / "unet_3D_dt_golden.pt", weights_only=True)
    net = unet_3D_dt(n_classes=2, in_channels=1)
    net.load_state_dict(golden["state_dict"], strict=True)
    net = net.cuda().eval()
    if fast:
        make_fast(net)
    with torch.no_grad():
        dis, logits = net(golden["input"].cuda())
    torch.testing.assert_close(logits.cpu(), golden["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dis.cpu(), golden["dis"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("it", [0, 1234, 29999])
def test_ugmcl_objective_on_cuda_reproduces_the_golden_terms(golden_dir: Path, it: int) -> None:
    golden = torch.load(golden_dir / "ugmcl_step_golden.pt", weights_only=True)
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in golden.items()}
    uncertainty, _ = entropy_of_mean_softmax(cuda["mc_logits"])
    terms = ugmcl_objective(
        cuda["student_dis"], cuda["student_logits"], cuda["teacher_logits"], uncertainty, cuda["label"],
        cuda["labeled_bs"], it, threshold_rampup=cuda["max_iterations"],
    )
    for name, value in golden["results_by_iteration"][it].items():
        if isinstance(value, float):
            assert terms[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        else:
            got = terms[name].cpu()
            if value.dtype == torch.bool:  # masks: a voxel whose uncertainty sits on the threshold may flip
                assert (got != value).float().mean() < 1e-4, name
            else:
                torch.testing.assert_close(got, value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_instance_norm_relu_on_cuda_equals_the_modules_with_gradients(layout) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(2, 6, 9, 8, 7, generator=g, device="cuda", dtype=torch.float64) * 3 + 1).contiguous(
        memory_format=layout
    )
    grad = torch.randn(2, 6, 9, 8, 7, generator=g, device="cuda", dtype=torch.float64)
    x.requires_grad_()
    ours = instance_norm_relu(x)
    plain = F.relu(F.instance_norm(x))
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12)
    assert ours.is_contiguous(memory_format=layout)
    g_ours, g_plain = (torch.autograd.grad(y, x, grad)[0] for y in (ours, plain))
    torch.testing.assert_close(g_ours, g_plain, rtol=0, atol=1e-12)


def _step_loss(amp: bool, fast: bool) -> float:
    """First UG-MCL training-step loss of a fixed small unet_3D_dt on a fixed batch, same random stream."""
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=8).cuda().train()
    if fast:
        make_fast(net)
    cfg = TrainConfig(patch_size=(32, 32, 32), batch_size=2, labeled_bs=1, mc_passes=4, max_iterations=100)
    method = UGMCL(net, cfg)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, 32, 32, 32, generator=g)
    label = (image[:, 0] > 0.8).long()
    image = image + label.unsqueeze(1)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss, _ = method.training_step(Batch(image.cuda(), label.cuda(), 1), 60)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    return float(loss)


def test_training_step_on_cuda_fast_network_and_bf16_agree_with_plain_fp32(true_fp32) -> None:
    plain = _step_loss(amp=False, fast=False)
    assert _step_loss(amp=False, fast=True) == pytest.approx(plain, rel=1e-4)
    assert _step_loss(amp=True, fast=True) == pytest.approx(plain, rel=0.1)  # bf16: a few digits only


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats_cuda")
    write_synthetic_h5_dataset(root, n_cases=7, shape=(36, 36, 34), seed=3, n_val=1, n_test=1)
    return root


def test_training_on_cuda_with_amp_writes_outputs_that_load_on_cpu_and_resumes(tiny_root: Path, tmp_path: Path):
    cfg = TrainConfig(
        root_path=str(tiny_root), exp="tiny", labeled_num=2, patch_size=(32, 32, 32), feature_scale=16,
        max_iterations=4, batch_size=2, labeled_bs=1, mc_passes=3, val_interval=2, save_interval=2,
        num_workers=2, device="cuda", amp=True, speed=SpeedOptions(fast_network=True), stride_xy=16, stride_z=16,
    )
    train(cfg, model_dir=tmp_path, progress=False, stop_after=2)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    assert torch.load(out / "checkpoint_latest.pth", weights_only=True, map_location="cpu")["iteration"] == 2
    summary = train(replace(cfg, resume=True), model_dir=tmp_path, progress=False)
    assert summary["iterations"] == 4
    state = torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True)  # no map_location: as saved
    assert all(v.device.type == "cpu" for v in state.values())
    net = unet_3D_dt(feature_scale=16)
    net.load_state_dict(state)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        cpu = net.eval()(x)[1]
        gpu = net.cuda()(x.cuda())[1].cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)  # TF32 convs on the GPU


@pytest.mark.parametrize("amp, fast", [(False, False), (False, True), (True, True)])
def test_sliding_window_labels_on_cuda_agree_with_cpu(true_fp32, amp: bool, fast: bool) -> None:
    torch.manual_seed(3)
    net = unet_3D_dt(feature_scale=8).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(70, 52, 40)).astype(np.float32)
    kwargs = dict(patch=(32, 32, 32), stride_xy=16, stride_z=16, batch_size=2)
    cpu = predict_volume_labels(net, image, device="cpu", **kwargs)
    on_gpu = make_fast(copy.deepcopy(net).cuda()) if fast else net  # the door leaves CUDA plain; forced here
    gpu = predict_volume_labels(on_gpu, image, device="cuda", amp=amp, **kwargs)
    assert gpu.shape == cpu.shape == image.shape
    agreement = (gpu == cpu).mean()
    assert agreement > (0.97 if amp else 0.9999), agreement


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 9, 7)])
def test_cuda_bf16_conv3d_weight_gradient_on_thin_inputs_is_right(shape) -> None:
    # torch's CPU bf16 kernel gets this wrong (networks/conv.py works around it there); is the CUDA one right?
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 8, 3, padding=1).cuda()
    x = torch.randn(2, 16, *shape, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv(x)
    (g,) = torch.autograd.grad(y.float().square().sum(), conv.weight)
    ref_conv = torch.nn.Conv3d(16, 8, 3, padding=1).double().cuda()
    ref_conv.load_state_dict(conv.state_dict())
    (ref,) = torch.autograd.grad(ref_conv(x.double()).square().sum(), ref_conv.weight)
    assert torch.isfinite(g).all()
    assert ((g.double() - ref).norm() / ref.norm()).item() < 3e-2


@pytest.mark.xfail(
    strict=True,
    reason="measured on an H200 (torch 2.11): the low-memory order draws its dropout masks ahead with other CUDA "
    "Philox offsets than F.dropout uses, so its random stream differs from the released order's (first loss 1.0448 "
    "against 1.0489); on CPU the two orders agree bit for bit. Strict: passing means the streams now match.",
)
def test_low_memory_order_on_cuda_gives_the_released_losses(true_fp32) -> None:
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        logs = []
        for low_memory in (False, True):
            torch.manual_seed(0)
            net = unet_3D_dt(feature_scale=8).cuda().train()
            cfg = TrainConfig(patch_size=(32, 32, 32), batch_size=2, labeled_bs=1, mc_passes=4, mc_chunk=2,
                              max_iterations=100, low_memory=int(low_memory))
            passes = prepare_training(net, SpeedOptions(keep_freed_memory=0), torch.device("cuda")).passes
            method = UGMCL(net, cfg, passes=passes)
            g = torch.Generator().manual_seed(1)
            image = torch.randn(2, 1, 32, 32, 32, generator=g)
            label = (image[:, 0] > 0.8).long()
            torch.manual_seed(7)
            _, log = method.training_step(Batch(image.cuda(), label.cuda(), 1), 60)
            logs.append(log)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    released, reordered = logs
    for key in released:
        assert reordered[key] == pytest.approx(released[key], rel=1e-5, abs=1e-7), key


def _relative_gradient_error(net: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """``||g - g_ref|| / ||g_ref||`` of all parameter gradients of ``mean(z^2) + mean(tanh z)`` against a reference."""
    net.zero_grad(set_to_none=True)
    dis, logits = net(x)
    (logits.square().mean() + dis.mean()).backward()
    got = torch.cat([p.grad.detach().flatten().cpu().double() for p in net.parameters()])
    return ((got - reference).norm() / reference.norm()).item()


def test_compiled_unet_3D_dt_on_cuda_reproduces_the_golden_outputs_and_float64_gradients(
    golden_dir: Path, true_fp32
) -> None:
    golden = torch.load(golden_dir / "unet_3D_dt_golden.pt", weights_only=True)
    eager = unet_3D_dt(n_classes=2, in_channels=1)
    eager.load_state_dict(golden["state_dict"], strict=True)
    reference = copy.deepcopy(eager).double().eval()  # float64 on the CPU: the independent reference
    dis, logits = reference(golden["input"].double())
    (logits.square().mean() + dis.mean()).backward()
    g_ref = torch.cat([p.grad.flatten() for p in reference.parameters()])
    eager = eager.cuda().eval()
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)  # Inductor, as --compile 1
    x = golden["input"].cuda()
    with torch.no_grad():
        dis, logits = compiled(x)
    torch.testing.assert_close(logits.cpu(), golden["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dis.cpu(), golden["dis"], rtol=1e-4, atol=1e-4)
    # The biases before each InstanceNorm get gradients of pure rounding noise (the norm removes them), so the check is
    # on all gradients together, against float64, with eager fp32 on the same GPU as the yardstick.
    err_eager = _relative_gradient_error(eager, x, g_ref)
    err_compiled = _relative_gradient_error(compiled, x, g_ref)
    print(f"relative gradient error vs float64: eager {err_eager:.2e}, compiled {err_compiled:.2e}")
    assert err_compiled < max(4 * err_eager, 1e-4), (err_eager, err_compiled)


def test_training_on_cuda_with_compile_gives_finite_losses_and_a_plain_best_model(tiny_root: Path, tmp_path: Path):
    cfg = TrainConfig(
        root_path=str(tiny_root), exp="tiny", labeled_num=2, patch_size=(32, 32, 32), feature_scale=16,
        max_iterations=3, batch_size=2, labeled_bs=1, mc_passes=3, val_interval=3, save_interval=3,
        num_workers=2, device="cuda", amp=True, speed=SpeedOptions(compile=True), deterministic=0, low_memory=0,
        mc_chunk=0,
        stride_xy=16, stride_z=16,
    )
    train(cfg, model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / "unet_3D_dt"
    log = (out / "log.txt").read_text()
    losses = logged_losses(log)
    assert len(losses) == 3 and all(np.isfinite(losses)) and 0.1 < losses[0] < 10, losses
    net = unet_3D_dt(feature_scale=16)
    net.load_state_dict(torch.load(out / "unet_3D_dt_best_model.pth", weights_only=True), strict=True)
