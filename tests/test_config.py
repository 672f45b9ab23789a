from pathlib import Path

import pytest
import yaml

from cgn_dist.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("overrides,needle", [
    (["train.nope=1"], "unknown key 'train.nope'"),
    (["nope=1"], "unknown key 'nope'"),
    (["train.max_steps=ten"], "train.max_steps: expected int"),
    (["train.resume=maybe"], "train.resume: expected bool"),
    (["train.engine=jax"], "accepted: 'torch', 'deepspeed'"),
    (["imagenet.truncation=0"], "truncation must lie in (0, 1]"),
    (["generate.truncation=1.01"], "truncation must lie in (0, 1]"),
    (["train.zero_stage=3"], "train.zero_stage"),
    (["mnist.style_weights=[1,2]"], "needs 4 values"),
    (["train"], "not key=value"),
    (["generate.mode=fixed_classes"], "needs three class ids"),
    (["mnist.lr=2e-4x"], "mnist.lr: expected float"),
    (["mnist.mask_area_bounds=[0.5,0.2]"], "needs [lo, hi]"),
])
def test_bad_overrides_fail_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_sise: 3\n")
    with pytest.raises(ConfigError, match="micro_batch_sise"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_base_chain_and_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "mnist" / "wildlife.yaml", ["train.max_steps=7", "mnist.betas=[0.1, 0.2]"])
    assert cfg.name == "wildlife" and cfg.data.dataset == "wildlife" and cfg.mnist.disc == "conv"
    assert cfg.train.micro_batch_size == 16  # from the base file
    assert cfg.train.max_steps == 7 and cfg.mnist.betas == [0.1, 0.2]
    save_config(cfg, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 2e-4 as a string; as a float field's value it is the number 0.0002
    cfg = load_config(None, ["mnist.lr=2e-4", "mnist.betas=[5E-1, 9.99e-1]"])
    assert cfg.mnist.lr == 0.0002 and cfg.mnist.betas == [0.5, 0.999]
    f = tmp_path / "c.yaml"
    f.write_text("mnist:\n  lr: 1e-3\n")
    assert load_config(f).mnist.lr == 0.001


_ORIGINAL = {"colored": "cgn_colored_MNIST", "double_colored": "cgn_double_colored_MNIST",
             "wildlife": "cgn_wildlife_MNIST"}


@pytest.mark.parametrize("name", sorted(_ORIGINAL))
def test_mnist_configs_equal_the_authors_shipped_configs(name, shared_ref):
    theirs = yaml.safe_load((shared_ref / "original_mnist_checkpoints" / f"{_ORIGINAL[name]}.cfg.yaml").read_text())
    cfg = load_config(CONFIGS / "mnist" / f"{name}.yaml")
    m, t = cfg.mnist, cfg.train
    assert f"{cfg.data.dataset}_MNIST" == theirs["TRAIN"]["DATASET"]
    assert m.lambda_mask == theirs["LAMBDAS"]["MASK"]
    assert m.style_weights == theirs["LAMBDAS"]["PERC"]
    assert m.lr == theirs["LR"]["LR"] and m.betas == theirs["LR"]["BETAS"]
    assert m.disc == theirs["MODEL"]["DISC"] and m.ndf == theirs["MODEL"]["NDF"]
    assert m.init_type == theirs["MODEL"]["INIT_TYPE"] and m.init_gain == theirs["MODEL"]["INIT_GAIN"]
    assert (m.latent_dim, m.ngf, m.n_classes) == (theirs["MODEL"]["LATENT_SZ"], theirs["MODEL"]["NGF"], theirs["MODEL"]["N_CLASSES"])
    assert t.micro_batch_size == theirs["TRAIN"]["BATCH_SIZE"] and t.epochs == theirs["TRAIN"]["EPOCHS"]
    assert t.grad_accum == 1 and t.checkpoint_every == 1000  # the CLI's save_iter overrode SAVE_ITER


def test_renamed_sections_and_task_are_refused_with_the_new_name(tmp_path):
    from cgn_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"section classifier: was renamed mnist_classifier: .*mnist_classifier\.<key>"):
        load_config(None, ["classifier.epochs=2"])
    with pytest.raises(ConfigError, match=r"section pipeline: was renamed mnist_pipeline:"):
        load_config(None, ["pipeline.original_limit=5"])
    old = tmp_path / "old.yaml"
    old.write_text("task: classifier\n")
    with pytest.raises(ConfigError, match=r"task=classifier was renamed task=invariant"):
        load_config(old)
    assert load_config(None, ["mnist_classifier.epochs=2", "task=invariant"]).mnist_classifier.epochs == 2


def test_a_config_saved_under_the_old_names_still_reads():
    """A run directory's config.yaml from before the rename (resume, regenerate): read as renamed."""
    from cgn_dist.config import config_from_dict, config_to_dict

    d = config_to_dict(load_config(None, ["mnist_classifier.epochs=3", "mnist_pipeline.original_limit=7"]))
    d["classifier"], d["pipeline"] = d.pop("mnist_classifier"), d.pop("mnist_pipeline")
    d["task"] = "classifier"
    cfg = config_from_dict(d)
    assert (cfg.mnist_classifier.epochs, cfg.mnist_pipeline.original_limit, cfg.task) == (3, 7, "invariant")
