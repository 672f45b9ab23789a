"""Image conversion and JPEG encoding on the generation device: minmax normalisation vectorised on the device
against a per-image hand formulation, the encoder provenance from where the images really are, and (on CUDA)
nvJPEG bytes against a fully synchronised encode."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cgn_dist.data.pixels import image_u8 as _image_u8
from cgn_dist.data.pixels import minmax_uint8, to_uint8
from cgn_dist.generate.speed import jpeg_encoder_used, nvjpeg_encode

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _per_image_minmax(x: torch.Tensor) -> np.ndarray:
    """torchvision make_grid(normalize=True) + save_image's conversion, one image at a time, in Python floats."""
    out = []
    for img in x.detach().float().cpu():
        low, high = float(img.min()), float(img.max())
        img = img.clamp(min=low, max=high).sub(low).div(max(high - low, 1e-5))
        out.append(img.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return np.stack(out)


def _batch(device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    x[1] = x[1] * 0.1 + 0.3  # low contrast: stretched a lot
    x[2] = 0.25  # constant: range 0, divided by 1e-5, all zero
    x[3, :, 0, 0] = -1.0  # extremes set exactly
    x[3, :, 0, 1] = 1.0
    return x.to(device)


def test_minmax_vectorised_matches_the_per_image_formulation():
    x = _batch()
    want = _per_image_minmax(x)
    got = minmax_uint8(x)
    assert got.shape == (6, 16, 16, 3) and got.dtype == torch.uint8 and got.is_contiguous()
    assert np.array_equal(got.numpy(), want)
    assert (got[2] == 0).all() and got[3].max() == 255 and got[3].min() == 0
    assert np.array_equal(to_uint8(x, "minmax"), want)
    xb = x.bfloat16()  # the sampler's precision: converted to fp32 on the device first, as the reference
    assert np.array_equal(minmax_uint8(xb).numpy(), _per_image_minmax(xb))


def test_encoder_provenance_comes_from_where_the_images_are():
    u8 = _image_u8(_batch(), "minmax")
    assert jpeg_encoder_used(u8) == "torchvision-cpu"  # CPU tensors: torchvision runs libjpeg, not nvJPEG
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32)  # smooth: JPEG keeps it closely
    smooth = _image_u8(ramp, "minmax")
    encoded, used = nvjpeg_encode(smooth, quality=95)
    assert used == "torchvision-cpu"
    decoded = np.asarray(Image.open(io.BytesIO(encoded[0])))
    assert decoded.shape == (32, 32, 3) and np.abs(decoded.astype(int) - smooth[0].numpy()).max() <= 8


@pytest.mark.gpu
@needs_cuda
def test_minmax_stays_on_the_gpu_and_is_encoded_by_nvjpeg():
    x = _batch("cuda")
    u8 = _image_u8(x, "minmax")
    assert u8.is_cuda and jpeg_encoder_used(u8) == "nvjpeg"
    assert np.array_equal(u8.cpu().numpy(), _per_image_minmax(x.cpu()))


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_encodes_finished_images():
    # A long kernel chain queued right before the encode: without the stream wait, nvJPEG (on its own stream)
    # may read the uint8 buffer before the conversion has written it.
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.rand(16, 3, 512, 512, device="cuda", generator=g) * 2 - 1
    for _ in range(5):
        x = base
        for _ in range(30):
            x = torch.tanh(x * 1.01 + 0.001)
        u8 = minmax_uint8(x)
        fast, used = nvjpeg_encode(u8, quality=90)
        torch.cuda.synchronize()
        ref, _ = nvjpeg_encode(u8.clone(), quality=90)
        assert used == "nvjpeg" and fast == ref


@pytest.mark.gpu
@needs_cuda
def test_sampler_provenance_says_nvjpeg_with_minmax_on_cuda(tmp_path):
    from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
    from cgn_dist.sharding.run import generate_dataset

    factory = ImagenetCounterfactualFactory(biggan="tiny", u2net="tiny", model_seed=0, forward_batch=4,
                                            truncation=0.5, device="cuda", image_format="jpg",
                                            jpeg_encoder="nvjpeg", normalize="minmax", save_layers=True)
    m = generate_dataset(factory, tmp_path / "out", 8, 4, 0, batch_size=4, progress=False)
    assert m["sampler_info"]["jpeg_encoder"] == "nvjpeg" and m["sampler_info"]["device"] == "cuda"
