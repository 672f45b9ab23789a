"""CGN-MNIST training: a few real steps, logging, checkpoints, bitwise resume, DeepSpeed parity."""
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cgn_dist.config import load_config
from cgn_dist.train.checkpoint import list_checkpoints
from cgn_dist.train.mnist import train_mnist

TINY = Path(__file__).resolve().parents[1] / "configs" / "debug" / "mnist_tiny.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"out_dir={tmp_path}", *overrides])


def _weights(run_dir: Path, step: int, name: str = "generator") -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:07d}" / f"{name}.pt", weights_only=True)


def test_three_steps_write_run_dir_tensorboard_and_sheets(tmp_path):
    out = train_mnist(_cfg(tmp_path, "name=r"))
    run = Path(out["run_dir"])
    assert out["steps"] == 3 and torch.isfinite(torch.tensor(out["loss/g_total"]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["name"] == "r"
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "sheet_classes_0000002.png", "sheet_classes_0000003.png",
        "sheet_counterfactuals_0000002.png", "sheet_counterfactuals_0000003.png"]
    acc = EventAccumulator(str(run / "tb")).Reload()
    assert {"loss/g_total", "loss/d", "mask/mean"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/d")] == [1, 2, 3]
    assert sorted(acc.Tags()["images"]) == ["sheet/classes", "sheet/counterfactuals"]


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    full = Path(train_mnist(_cfg(tmp_path, "name=full", "train.max_steps=4"))["run_dir"])
    part = _cfg(tmp_path, "name=part", "train.max_steps=2")
    train_mnist(part)
    resumed = Path(train_mnist(_cfg(tmp_path, "name=part", "train.max_steps=4"))["run_dir"])
    for name in ("generator", "discriminator"):
        a, b = _weights(full, 4, name), _weights(resumed, 4, name)
        for k in a["module"]:
            assert torch.equal(a["module"][k], b["module"][k]), (name, k)
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = Path(train_mnist(_cfg(tmp_path, "name=k", "train.max_steps=4", "train.checkpoint_every=1",
                                "train.keep_last=2"))["run_dir"])
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]


def test_deepspeed_zero0_fp32_matches_torch_engine(tmp_path):
    t = Path(train_mnist(_cfg(tmp_path, "name=t"))["run_dir"])
    d = Path(train_mnist(_cfg(tmp_path, "name=d", "train.engine=deepspeed"))["run_dir"])
    a = _weights(t, 3)["module"]
    b = torch.load(d / "checkpoints" / "step_0000003" / "generator" / "mp_rank_00_model_states.pt",
                   weights_only=False)["module"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _gram(f):
    c, hw = f.shape[1], f.shape[2] * f.shape[3]
    return torch.einsum("bchw,bdhw->bcd", f, f) / (c * hw)


def test_two_updates_equal_a_hand_written_step(tmp_path):
    """Spec §1.4 written out by hand: G loss = LSGAN(D(x_gen), 1) + λ·mean H2(m) + Σ w²·5000·L1(Gram), G steps;
    then D on (real, 1) and the same, pre-update x_gen detached (0), halved. Same seeds and draw order."""

    from cgn_dist.data.mnist import build_mnist_dataset
    from cgn_dist.losses import VGG16Features
    from cgn_dist.train.common import step_seed
    from cgn_dist.data.batch_order import BatchStream
    from cgn_dist.train.mnist import build_discriminator, build_generator

    cfg = _cfg(tmp_path, "name=h", "train.max_steps=2", "train.checkpoint_every=1", "train.keep_last=2")
    out = train_mnist(cfg)
    m, t = cfg.mnist, cfg.train
    gen, disc = build_generator(cfg), build_discriminator(cfg)
    vgg = VGG16Features(m.vgg_weights)
    opt_g = torch.optim.Adam(gen.parameters(), lr=m.lr, betas=tuple(m.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=m.lr, betas=tuple(m.betas))
    ds = build_mnist_dataset(cfg.data.dataset, "train", source=cfg.data.source, root=cfg.data.root,
                             seed=cfg.data.seed, textures_dir=cfg.data.textures or None, download=cfg.data.download)
    stream = BatchStream(ds, t.micro_batch_size, cfg.seed)
    for step in range(2):
        torch.manual_seed(step_seed(cfg.seed, 0, step, 0))
        x_real, y_real = stream.batch(step)
        y_gen = torch.randint(0, m.n_classes, (x_real.shape[0],))
        mask, _, _, x_gen = gen(y_gen)
        adv = ((disc(x_gen, y_gen) - 1) ** 2).mean()
        binary = m.lambda_mask * (-(mask * torch.log2(mask) + (1 - mask) * torch.log2(1 - mask))).mean()
        fx, fr = vgg(x_gen), [f.detach() for f in vgg(x_real)]
        perc = sum(w * w * 5000 * (_gram(a) - _gram(b)).abs().mean()
                   for w, a, b in zip(m.style_weights, fx, fr) if w)
        opt_g.zero_grad()
        (adv + binary + perc).backward()
        opt_g.step()
        d_loss = (((disc(x_real, y_real) - 1) ** 2).mean() + (disc(x_gen.detach(), y_gen) ** 2).mean()) / 2
        opt_d.zero_grad()  # drops what the G loss left in D: D is not trained by it
        d_loss.backward()
        opt_d.step()
    for name, want in (("loss/g_adv", adv), ("loss/g_binary", binary), ("loss/g_perceptual", perc),
                       ("loss/g_total", adv + binary + perc), ("loss/d", d_loss)):
        assert out[name] == pytest.approx(want.item(), rel=1e-4, abs=1e-6), name
    run = Path(out["run_dir"])
    for name, module in (("generator", gen), ("discriminator", disc)):
        saved = _weights(run, 2, name)["module"]
        for k, v in module.state_dict().items():
            torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-6, msg=f"{name}.{k}")


def test_ema_is_the_recursion_over_the_live_weights_and_resumes_bitwise(tmp_path):
    """generator_ema.pt after 4 updates = copy at update 1, then e <- d*e + (1-d)*w for the live weights
    saved at updates 2..4 (parameters and BatchNorm statistics); a resumed run ends with the same EMA;
    generation reads the EMA from a step directory."""
    from cgn_dist.generate.mnist import resolve_generator_file

    d = 0.9
    ema = ("mnist.ema_decay=0.9", "train.checkpoint_every=1", "train.keep_last=10")
    full = Path(train_mnist(_cfg(tmp_path, "name=full", "train.max_steps=4", *ema))["run_dir"])
    live = [_weights(full, s)["module"] for s in (1, 2, 3, 4)]
    expect = {k: v.double().clone() for k, v in live[0].items() if v.is_floating_point()}
    for w in live[1:]:
        for k in expect:
            expect[k] = d * expect[k] + (1 - d) * w[k].double()
    got = _weights(full, 4, "generator_ema")
    assert got["n_averaged"] == 4
    for k, v in expect.items():
        torch.testing.assert_close(got["module"][k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(got["module"]["f_shape.fc.weight"], live[3]["f_shape.fc.weight"])

    train_mnist(_cfg(tmp_path, "name=part", "train.max_steps=2", *ema))
    resumed = Path(train_mnist(_cfg(tmp_path, "name=part", "train.max_steps=4", *ema))["run_dir"])
    again = _weights(resumed, 4, "generator_ema")
    assert all(torch.equal(got["module"][k], again["module"][k]) for k in got["module"])
    step4 = full / "checkpoints" / "step_0000004"
    assert resolve_generator_file(step4).name == "generator_ema.pt"
    assert resolve_generator_file(step4 / "generator.pt").name == "generator.pt"


def test_turning_the_ema_on_in_a_run_needs_consent_and_starts_at_the_resumed_weights(tmp_path):
    from cgn_dist.config import ConfigError

    train_mnist(_cfg(tmp_path, "name=r", "train.max_steps=2"))
    with pytest.raises(ConfigError, match="mnist.ema_decay: 0.0 -> 0.99"):
        train_mnist(_cfg(tmp_path, "name=r", "train.max_steps=3", "mnist.ema_decay=0.99"))
    run = Path(train_mnist(_cfg(tmp_path, "name=r", "train.max_steps=3", "mnist.ema_decay=0.99",
                                "train.allow_config_change=true"))["run_dir"])
    live2, live3 = _weights(run, 2)["module"], _weights(run, 3)["module"]
    ema3 = _weights(run, 3, "generator_ema")
    assert ema3["n_averaged"] == 1  # one update since the resume: a copy of the live weights
    assert torch.equal(ema3["module"]["f_shape.fc.weight"], live3["f_shape.fc.weight"])
    assert not torch.equal(live2["f_shape.fc.weight"], live3["f_shape.fc.weight"])
