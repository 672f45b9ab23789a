"""The notebook API: tiny random ImageNet CGN, the authors' released MNIST CGN, and agreement with what
`cgn-dist generate` stored."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cgn_dist import weights
from cgn_dist.api import ImagenetCGN, MnistCGN
from cgn_dist.cli import main
from cgn_dist.data.shards import read_tar_samples


@pytest.fixture(scope="module")
def tiny():
    return ImagenetCGN.from_pretrained("tiny", truncation=0.5, num_threads=1, forward_batch=1, precision="fp32")


def test_imagenet_pil_output(tiny):
    out = tiny.counterfactual(shape=[1, 2], texture=[3, 4], background=[5, 6], seed=7)
    assert len(out) == 2 and out.classes == [(1, 3, 5), (2, 4, 6)] and out.seeds == [7, 8]
    assert out.names[0] == ("goldfish", "tiger shark", "electric ray")  # ImageNet ids 1, 3, 5
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in out.images + out.foregrounds + out.backgrounds)
    assert all(m.mode == "L" for m in out.masks)


def test_imagenet_mechanisms_take_their_own_class(tiny):
    a = tiny.counterfactual(shape=1, texture=3, background=5, seed=0, output_type="pt")
    b = tiny.counterfactual(shape=2, texture=3, background=6, seed=0, output_type="pt")
    # Same texture class and seed -> the same foreground whatever the shape; other shape -> other premask.
    assert torch.equal(a.foregrounds, b.foregrounds)
    assert not torch.allclose(a.premasks, b.premasks)
    assert not torch.allclose(a.backgrounds, b.backgrounds)
    # The composite is the paper's x = m*f + (1-m)*b of the returned layers.
    torch.testing.assert_close(a.images, a.masks * a.foregrounds + (1 - a.masks) * a.backgrounds)
    assert a.images.shape == (1, 3, 32, 32) and a.masks.shape == (1, 1, 32, 32)


def test_imagenet_image_does_not_depend_on_its_batch(tiny):
    both = tiny.counterfactual(shape=[1, 2], texture=[3, 4], background=[5, 6], seed=[11, 12], output_type="np")
    alone = tiny.counterfactual(shape=2, texture=4, background=6, seed=12, output_type="np")
    np.testing.assert_array_equal(both.images[1], alone.images[0])


def test_imagenet_api_recomputes_what_generate_stored(tmp_path, tiny):
    assert main(["generate", "configs/debug/generate_tiny.yaml", f"out_dir={tmp_path}", "generate.n_samples=4",
                 "generate.shard_size=4", "generate.precision=fp32", "generate.forward_batch=1", "generate.image_format=png",
                 "generate.grid_every=0", "train.progress=false"]) == 0
    samples = list(read_tar_samples(tmp_path / "gen_tiny" / "shard-000000.tar"))
    assert len(samples) == 4
    metas = [json.loads(s["json"]) for s in samples]
    out = tiny.counterfactual(shape=[m["shape_cls"] for m in metas], texture=[m["texture_cls"] for m in metas],
                              background=[m["bg_cls"] for m in metas], seed=[m["seed"] for m in metas],
                              output_type="np")
    for stored, mine in zip(samples, out.images):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored["png"]))), mine)


def test_imagenet_bad_class_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"out of range for this model \(10 classes"):
        tiny.counterfactual(shape=1, texture=12)
    with pytest.raises(ValueError, match="output_type"):
        tiny.counterfactual(shape=1, output_type="jpeg")


@pytest.fixture(scope="module")
def released(shared_ref):
    return MnistCGN.from_pretrained(str(shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"))


def test_mnist_released_checkpoint(released):
    n = 16
    out = released.counterfactual(shape=[0] * n + [1] * n, texture=5, background=0, seed=0, output_type="pt")
    assert out.images.shape == (2 * n, 3, 32, 32)
    torch.testing.assert_close(out.images, out.masks * out.foregrounds + (1 - out.masks) * out.backgrounds)
    area = out.masks.mean(dim=(1, 2, 3))
    # A property of the digits themselves: a "1" covers far fewer pixels than a "0".
    assert area[n:].mean() < 0.75 * area[:n].mean()
    # Colored MNIST: one colour per class. Texture 5 and texture 2 give clearly different strokes.
    other = released.counterfactual(shape=[0] * n, texture=2, background=0, seed=0, output_type="pt")
    fg_a = (out.foregrounds[:n] * out.masks[:n]).sum(dim=(2, 3)) / out.masks[:n].sum(dim=(2, 3))
    fg_b = (other.foregrounds * other.masks).sum(dim=(2, 3)) / other.masks.sum(dim=(2, 3))
    assert (fg_a.mean(0) - fg_b.mean(0)).abs().max() > 0.2


def test_mnist_pil_and_batch_independence(released):
    out = released.counterfactual(shape=[3, 7], texture=[1, 2], background=[4, 5], seed=[21, 22])
    assert [im.size for im in out.images] == [(32, 32)] * 2 and out.masks[0].mode == "L"
    alone = released.counterfactual(shape=7, texture=2, background=5, seed=22, output_type="np")
    np.testing.assert_array_equal(np.asarray(out.images[1]), alone.images[0])


def test_mnist_by_weights_name(tmp_path, monkeypatch, shared_ref):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    with pytest.raises(weights.WeightsError, match="cgn-dist weights fetch cgn-mnist-wildlife"):
        MnistCGN.from_pretrained("cgn-mnist-wildlife")
    shutil.copy(shared_ref / "original_mnist_checkpoints" / "cgn_wildlife_MNIST.pth", tmp_path)
    cgn = MnistCGN.from_pretrained("cgn-mnist-wildlife")
    assert cgn.sha256 == weights.REGISTRY["cgn-mnist-wildlife"].sha256
    assert len(MnistCGN.from_pretrained("random").counterfactual(shape=[1, 2]).images) == 2


def test_the_readme_example_runs(tmp_path, monkeypatch, repo_root):
    text = (repo_root / "README.md").read_text()
    section = text[text.index("### Counterfactuals in a notebook"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "counterfactual.png").is_file()
    assert scope["out"].names[0] == ("goldfish", "tiger shark", "electric ray") and len(scope["digits"]) == 3


def test_imagenet_in_the_engines_bf16(tiny):
    low = ImagenetCGN.from_pretrained("tiny", truncation=0.5, num_threads=1, forward_batch=1, precision="bf16")
    a = low.counterfactual(shape=[1, 2], texture=3, background=5, seed=0, output_type="pt")
    b = tiny.counterfactual(shape=[1, 2], texture=3, background=5, seed=0, output_type="pt")
    assert a.images.dtype == torch.bfloat16  # tensors come in the model's precision
    assert (a.images.float() - b.images).abs().max() < 0.05  # bf16 rounding, not another image
