"""Every value of the two single-GPU ImageNet configs, pinned (spec §2.3-2.4)."""
from pathlib import Path

from cgn_dist.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "imagenet"

COMMON = dict(biggan="biggan-deep-256", truncation=1.0, lr_shape=8e-6, lr_bg=1e-5, betas=[0.9, 0.999],
              w_l1=100.0, w_binary=300.0, w_mask_area=500.0, mask_area_bounds=[0.1, 0.9],
              w_texture=[0.0, 5.0, 5.0, 0.0], w_background=2000.0, vgg_weights="imagenet",
              spectral_norm_updates=True)
SCHEDULE = dict(micro_batch_size=1, grad_accum=4000, max_steps=300, engine="torch", precision="fp32",
                checkpoint_every=1, sample_every=1, grad_reduction="sum")


def _check(cfg, **imagenet):
    assert cfg.task == "imagenet"
    for k, v in {**COMMON, **imagenet}.items():
        assert getattr(cfg.imagenet, k) == v, k
    for k, v in SCHEDULE.items():
        assert getattr(cfg.train, k) == v, k
    assert cfg.distributed.num_workers == 0  # one GPU, one process


def test_authors_code_config():
    _check(load_config(CONFIGS / "authors_code.yaml"), lr_text=3e-5, w_perceptual=[4.0] * 4)


def test_paper_config():
    _check(load_config(CONFIGS / "paper_single_gpu.yaml"), lr_text=1e-5, w_perceptual=[5.0] * 4)


def test_paper_classifier_data_config_saves_like_the_authors():
    cfg = load_config(CONFIGS.parent / "generate" / "imagenet_random.yaml")
    assert (cfg.generate.mode, cfg.generate.truncation, cfg.generate.image_format) == ("random", 0.5, "jpg")
    assert cfg.generate.normalize == "minmax"  # save_image(normalize=True): per-image min-max
