"""The invariant classifier's step: channels-last (where cgn_dist.precision.use_channels_last says so) is the
same math as NCHW, and DeepSpeed's bf16 for it is autocast over fp32 weights, so BatchNorm's weights and
running statistics stay fp32 and the loss is an fp32 step's within bf16 rounding."""
import copy

import pytest
import torch

from cgn_dist.classifier.imagenet.train import classifier_losses
from cgn_dist.config import load_config
from cgn_dist.distributed.deepspeed import build_ds_config
from cgn_dist.distributed.env import DistEnv, pick_device
from cgn_dist.models.invariant import InvariantClassifier
from cgn_dist.precision import decide_channels_last

CF_KEYS = ("shape_cls", "texture_cls", "bg_cls")


def _batch(device, n=4, size=32, n_classes=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 3, size, size, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    cf = {k: torch.randint(0, n_classes, (n,), generator=g) for k in CF_KEYS}
    return x.to(device), y.to(device), {k: v.to(device) for k, v in cf.items()}


def _model(freeze_bn=True):
    return InvariantClassifier("resnet18", n_classes=10, weights="random", seed=3, freeze_bn=freeze_bn).train()


def _loss_and_grads(model, x, y, cf):
    out = model(x)
    loss = classifier_losses(out, y, cf, len(y))[0]["total"]
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_the_layout_decision():
    assert decide_channels_last({"type": "cuda", "cuda_bf16": True}, "bf16")
    assert decide_channels_last({"type": "cuda", "cuda_bf16": False}, "fp32")
    # CPU: NCHW on AVX2 (benchmarks/bench_classifier_step.py measured no gain from channels-last there, fp32
    # or emulated bf16); NHWC with AVX-512 BF16 (1.12-1.27x faster on an EPYC Zen 4); AMX not measured: NCHW
    avx2 = {"type": "cpu", "amx": False, "avx512_bf16": False, "avx2": True, "isa_cap": None}
    for caps in (avx2, {**avx2, "amx": True, "avx512_bf16": True}):
        assert not decide_channels_last(caps, "fp32") and not decide_channels_last(caps, "bf16")
    zen4 = {**avx2, "avx512_bf16": True}
    assert decide_channels_last(zen4, "fp32") and decide_channels_last(zen4, "bf16")


def _same_math(device):
    x, y, cf = _batch(device)
    nchw = _model().to(device)
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    assert cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loss_a, grads_a = _loss_and_grads(nchw, x, y, cf)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert x_cl.stride() != x.stride()
    loss_b, grads_b = _loss_and_grads(cl, x_cl, y, cf)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k].contiguous(), grads_a[k].contiguous(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{k}: {m}")


def test_one_channels_last_step_has_the_loss_and_gradients_of_nchw():
    torch.backends.mkldnn.deterministic = True
    _same_math(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN's NHWC kernels)")
def test_one_channels_last_step_on_cuda_has_the_loss_and_gradients_of_nchw(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _same_math(torch.device("cuda"))


def _train_cfg(*over):
    return load_config(None, ["train.engine=deepspeed", "train.precision=bf16", "train.micro_batch_size=4",
                              *over]).train


def test_bf16_autocast_config_has_no_bf16_cast_and_reduces_in_fp32():
    cfg = build_ds_config(_train_cfg("train.zero_stage=0", "train.grad_accum=8"), 1, autocast=True)
    assert "bf16" not in cfg and "data_types" not in cfg  # fp32 weights: fp32 gradients, ZeRO-0 accumulation ok
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert build_ds_config(_train_cfg("train.zero_stage=1"), 1)["bf16"] == {"enabled": True}  # others: as before


def _bn_tensors(module):
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for k in ("weight", "bias", "running_mean", "running_var"):
                out[f"{name}.{k}"] = getattr(m, k)
    return out


def _deepspeed_step(model, stage, autocast, x, y, cf):
    from cgn_dist.distributed.engine import build_engine

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = build_engine(model, opt, _train_cfg(f"train.zero_stage={stage}"), DistEnv(device=x.device),
                          bf16_autocast=autocast)
    try:
        with engine.autocast():
            out = engine(x)
        loss = classifier_losses(out, y, cf, len(y))[0]["total"]
        engine.backward(loss)
        engine.step()
        assert not autocast or out["avg"].dtype == torch.bfloat16  # the step did run in bf16
        return float(loss.detach()), {k: v.detach().clone() for k, v in _bn_tensors(engine.module).items()}, \
            {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    finally:
        engine.engine.destroy()


@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_bf16_keeps_batchnorm_fp32_and_the_loss_of_an_fp32_step(stage, monkeypatch):
    # on CUDA where there is one (DeepSpeed picks its accelerator once per process), else on the CPU
    device = pick_device("auto")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # an fp32 reference, not TF32
    x, y, cf = _batch(device)
    ref_model = _model(freeze_bn=False).to(device)  # BN in train mode: its running statistics move this step
    start = copy.deepcopy(ref_model)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_loss = classifier_losses(ref_model(x), y, cf, len(y))[0]["total"]
    ref_loss.backward()
    opt.step()
    ref_loss = float(ref_loss.detach())
    ref_bn = _bn_tensors(ref_model)

    loss, bn, state = _deepspeed_step(copy.deepcopy(start), stage, True, x, y, cf)
    assert bn and all(v.dtype == torch.float32 for v in bn.values()), {k: v.dtype for k, v in bn.items()}
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    # bf16 convolutions (so not the fp32 loss to the bit), fp32 elsewhere
    assert loss != ref_loss and abs(loss - ref_loss) <= 2e-2 * abs(ref_loss)
    for k in ref_bn:
        if k.endswith(("running_mean", "running_var")):  # statistics of bf16 activations, kept in fp32
            torch.testing.assert_close(bn[k], ref_bn[k], rtol=3e-2, atol=3e-3, msg=lambda m: f"{k}: {m}")

    # DeepSpeed's own bf16 mode, as the classifier used it: BatchNorm cast to bf16 (what autocast avoids)
    _, bn_cast, _ = _deepspeed_step(copy.deepcopy(start), stage, False, x, y, cf)
    assert all(v.dtype == torch.bfloat16 for v in bn_cast.values())


def test_auto_precision_allows_bf16_for_zero0_accumulation_only_under_autocast(monkeypatch):
    import cgn_dist.distributed.engine as engine_module

    monkeypatch.setattr(engine_module, "resolve_precision", lambda *a, **k: "bf16")  # a device that runs bf16
    over = ("train.precision=auto", "train.zero_stage=0", "train.grad_accum=4")
    cast, autocast = _train_cfg(*over), _train_cfg(*over)
    engine_module.resolve_train_precision(cast, "cpu")
    engine_module.resolve_train_precision(autocast, "cpu", autocast=True)
    assert (cast.precision, autocast.precision) == ("fp32", "bf16")
