"""The one console script: ``cgn-dist <subcommand> [CONFIG] [key=value ...]``.

Each subcommand loads the config (file + dotted overrides) and makes one call.
Config fields are never mirrored as flags: overrides are the only way in.
A mistake in the input or the environment (config, missing weights, offline, disk full) ends with one
line on stderr and exit code 2; ``--debug`` (or CGN_DIST_DEBUG=1) shows the traceback instead. Only the
project's own error types (cgn_dist.errors.UserError) and the machine's (disk full, read-only, no
permission) read so: any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cgn_dist.config import ConfigError, load_config
from cgn_dist.errors import UserError, is_machine_error
from cgn_dist.interrupts import Interrupted
from cgn_dist.storage import is_remote


def _cfg(args):
    return load_config(args.config, args.overrides)


def _train_in_bucket(cfg) -> int:
    from cgn_dist.train.bucket_run import train_in_bucket

    if cfg.distributed.num_workers > 0:
        raise ConfigError(f"out_dir={cfg.out_dir} (a bucket) trains with distributed.num_workers=0; for Ray Train "
                          "give out_dir a shared mount and ray.storage_path the bucket")
    from cgn_dist.launchers.tasks import training_loop

    print(json.dumps(train_in_bucket(cfg, training_loop(cfg.task)), indent=1, default=str))
    return 0


def _preflight(cfg, command: str):
    """On Ray, the doctor's cheap checks (paths seen from every node, resources fit) before any work."""
    from cgn_dist.doctor import preflight

    preflight(cfg, command)
    return cfg


def cmd_doctor(args) -> int:
    """Preflight: versions, GPUs, NCCL, matrix units, paths and weights on every node, resources."""
    from cgn_dist.doctor import run_doctor

    if args.config and "=" in args.config and not os.path.isfile(args.config):  # overrides only, no file
        args.overrides, args.config = [args.config, *args.overrides], None
    text, code = run_doctor(_cfg(args))
    print(text)
    return code


def cmd_train(args) -> int:
    from cgn_dist.train.run_dir import discard_unstarted

    cfg = _cfg(args)
    if is_remote(cfg.out_dir):
        return _train_in_bucket(cfg)
    _preflight(cfg, "train")
    existed = cfg.run_dir.exists()
    ray_dir = None if is_remote(cfg.ray.storage_path) else Path(cfg.ray.storage_path or Path(cfg.out_dir) / "ray") / cfg.name
    ray_existed = ray_dir is not None and ray_dir.exists()
    try:
        if cfg.distributed.num_workers > 0:
            from cgn_dist.launchers.ray_train import train_with_ray

            result = train_with_ray(cfg)
        else:
            from cgn_dist.launchers.tasks import training_loop

            result = training_loop(cfg.task)(cfg)
    except BaseException:
        if _is_main():  # failed before its first checkpoint: leave no run behind
            discard_unstarted(cfg.run_dir, existed)
            if not cfg.run_dir.exists() and ray_dir is not None:
                discard_unstarted(ray_dir, ray_existed)
        raise
    if _is_main():  # one summary, whichever launcher (torchrun starts one per rank)
        print(json.dumps(result, indent=1, default=str))
    return 0


def cmd_config(args) -> int:
    import yaml

    from cgn_dist.config import config_to_dict, format_config_docs

    cfg = _cfg(args)
    print(format_config_docs(cfg) if args.doc else yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def cmd_weights(args) -> int:
    """List every weight file cgn_dist can use, or fetch some."""
    from cgn_dist import weights

    if args.action == "list":
        print(weights.format_listing())
        return 0
    if not args.names:
        raise weights.WeightsError(f"weights fetch needs a NAME: one of {', '.join(weights.REGISTRY)}")
    for name in args.names:
        path = weights.fetch(name, progress=True, force=args.force)
        print(f"{name}: {path} (sha256 checked)")
    return 0


def cmd_import(args) -> int:
    """Convert an authors' released checkpoint into a cgn_dist weights file."""
    from cgn_dist.models.importers import import_original_checkpoint

    out = import_original_checkpoint(args.src, args.dst, kind=args.kind)
    print(f"wrote {out}")
    return 0


def cmd_mnist_pipeline(args) -> int:
    from cgn_dist.pipelines.mnist import run_mnist_pipeline

    summary = run_mnist_pipeline(_cfg(args))
    print(f"table: {summary['table']['txt']} (+ .json .csv .png)")
    return 0


def cmd_generate(args) -> int:
    """Counterfactual data set (shards + manifest), a dry run, or an ImageNet interpolation sheet."""
    from cgn_dist.generate.command import run_generate

    print(json.dumps(run_generate(_preflight(_cfg(args), "generate")), indent=1, default=str))
    return 0


def cmd_regenerate(args) -> int:
    """Recompute one stored sample from its run's manifest; exit 1 unless it equals the stored bytes."""
    from cgn_dist.generate.command import run_regenerate

    report = run_regenerate(args.run_dir, args.key, out=args.out)
    print(json.dumps(report, indent=1))
    return 0 if report["identical"] else 1


def cmd_verify(args) -> int:
    """Check a shard folder against its manifest; exit 1 (and how to rebuild) when anything is wrong."""
    from cgn_dist.sharding.verify import format_report, verify_folder

    result = verify_folder(args.dir)
    print(format_report(result))
    return 1 if result["problems"] else 0


def cmd_eval(args) -> int:
    """ImageNet evaluations of a classifier: shape bias, IN-9, top-1/5, Inception Score; tables beside the paper."""
    from cgn_dist.classifier.imagenet.eval_command import run_eval

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not os.path.isfile(config):  # no config file, only overrides
        config, overrides = None, [config, *overrides]
    print(json.dumps(run_eval(load_config(config, overrides), args.what), indent=1, default=str))
    return 0


def cmd_imagenet_pipeline(args) -> int:
    from cgn_dist.pipelines.imagenet import run_imagenet_pipeline

    summary = run_imagenet_pipeline(_cfg(args))
    print(f"table: {summary['table']['txt']} (+ .json .csv .png)")
    return 0


def cmd_make_shards(args) -> int:
    """An image tree (ILSVRC-2012 train/val, any ImageFolder tree) into WebDataset shards + manifest."""
    from cgn_dist.ingest.make_shards import run_make_shards

    print(json.dumps(run_make_shards(_preflight(_cfg(args), "make-shards")), indent=1, default=str))
    return 0


def cmd_bench_train(args) -> int:
    from cgn_dist.bench import main_bench_train

    main_bench_train(_cfg(args))
    return 0


def _is_main() -> bool:
    from cgn_dist.distributed.env import is_main_process  # torch: imported once a command runs, not for --help

    return is_main_process()


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same."""
    out, skip_next = [], False
    for a in argv:
        if skip_next or a.startswith("--local_rank="):
            skip_next = False
            continue
        skip_next = a == "--local_rank"
        if not skip_next:
            out.append(a)
    return out


DEBUG_ENV = "CGN_DIST_DEBUG"
CONFIG_EPILOG = ("Every key, its value and its one-line doc: cgn-dist config --doc [CONFIG] [key=value ...]. "
                 "Add --debug to see a traceback.")


def _console_logging() -> None:
    """cgn_dist's INFO lines on the console (rank 0 only; others warnings): what a run does, as it does it.
    Training and generation add their run's log.txt (train.metrics.setup_logging)."""
    import logging

    root = logging.getLogger("cgn_dist")
    root.setLevel(logging.INFO if _is_main() else logging.WARNING)
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    # Taken out before argparse reads the line, so --debug may stand anywhere, even among the overrides;
    # the parsers declare it too, for their --help.
    return [a for a in argv if a != "--debug"], "--debug" in argv


DEBUG_HELP = f"show the traceback of an error instead of its one line (or set {DEBUG_ENV}=1)"
# What `cgn-dist CMD` without a config names as an example.
EXAMPLE_CONFIG = {"train": "configs/main.yaml", "mnist-pipeline": "configs/main.yaml",
                  "generate": "configs/generate/mnist_colored.yaml", "bench-train": "configs/debug/mnist_tiny.yaml",
                  "imagenet-pipeline": "configs/imagenet/paper_single_gpu.yaml",
                  "make-shards": "configs/shards/imagenet_train.yaml"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cgn-dist", description=__doc__, epilog=CONFIG_EPILOG)
    sub = p.add_subparsers(dest="cmd", required=True)

    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def add(name: str, help: str, epilog: str | None = CONFIG_EPILOG, usage: str | None = None):
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog, usage=usage)
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        return sp

    def with_config(name: str, fn, help: str, config_required: bool = True):
        extra = " [--doc]" if name == "config" else ""
        sp = add(name, help, usage=f"cgn-dist {name} [-h] [--debug]{extra} {'CONFIG' if config_required else '[CONFIG]'} "
                 "[key=value ...]")
        # nargs="?" even when required: argparse would name `overrides` as missing too; main() says it
        sp.add_argument("config", nargs="?", help="YAML config (overrides on the defaults), e.g. "
                        + EXAMPLE_CONFIG.get(name, "configs/main.yaml"))
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
        sp.set_defaults(fn=fn, config_required=config_required)
        return sp

    with_config("train", cmd_train, "train a CGN (MNIST or ImageNet; Ray Train when distributed.num_workers>0)")
    sp = with_config("config", cmd_config, "print the resolved config (--doc: with each key's doc)",
                     config_required=False)
    sp.add_argument("--doc", action="store_true", help="print every key as key: value  # its one-line doc")
    with_config("mnist-pipeline", cmd_mnist_pipeline,
                "the MNIST experiment end to end: CGN (or the released ones) -> counterfactuals -> classifiers -> table")
    with_config("bench-train", cmd_bench_train,
                "time per sample: torch vs DeepSpeed at one process, then 1 vs 2 Ray Train workers")
    with_config("generate", cmd_generate,
                "generate counterfactual shards (generate.dry_run=true: estimate; mode=interpolation: a sheet)")
    with_config("imagenet-pipeline", cmd_imagenet_pipeline,
                "ImageNet end to end: real shards -> counterfactuals -> invariant classifier -> evaluations -> table")
    sp = add("eval", "evaluate a classifier (eval.model): shape-bias | in9 | accuracy | inception | all; "
             "json/csv/png tables beside the paper's numbers (CONFIG is optional: overrides alone will do)")
    sp.add_argument("what", choices=["shape-bias", "in9", "accuracy", "inception", "all"])
    sp.add_argument("config", nargs="?", help="YAML config (overrides on the defaults)")
    sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.model=torchvision:resnet50")
    sp.set_defaults(fn=cmd_eval)
    with_config("make-shards", cmd_make_shards,
                "shard an image tree (ImageNet train/val, ImageFolder) into WebDataset tars (shards.dry_run=true: estimate)")
    with_config("doctor", cmd_doctor, "preflight on this machine or every Ray node (ray.address): versions, GPUs, "
                "NCCL, matrix units, paths, weights, disk, resources; one ok/FAIL line each", config_required=False)
    sp = add("regenerate", "recompute sample KEY of a generation run and check it against the stored bytes "
             "(exit 1 when they differ)", epilog=None)
    sp.add_argument("run_dir", help="the generation run's folder (with manifest.json)")
    sp.add_argument("key", help="sample key, e.g. 000000_000003")
    sp.add_argument("--out", default=None, help="where to write the regenerated image "
                    "(default ./KEY.<ext>)")
    sp.set_defaults(fn=cmd_regenerate)
    verify_help = ("check a shard folder (generate / make-shards) against its manifest: sizes, sha256, samples, "
                   "keys; lists each problem and the command that rebuilds it (exit 1 when any)")
    sp = add("verify", verify_help)
    sp.add_argument("dir", help="the shard folder (with manifest.json): a local path or s3://bucket/prefix")
    sp.set_defaults(fn=cmd_verify)
    sp = add("import", "convert the authors' released ckp.pth / cgn.pth into cgn_dist weights", epilog=None)
    sp.add_argument("src", help="the authors' checkpoint: MNIST ckp.pth (cgn_<dataset>_MNIST.pth) or ImageNet cgn.pth")
    sp.add_argument("dst", help="the cgn_dist weights file to write (e.g. weights/cgn_colored.pt), the value for "
                    "generate.checkpoint / mnist.init_from")
    sp.add_argument("--kind", choices=["auto", "mnist", "imagenet"], default="auto")
    sp.set_defaults(fn=cmd_import)
    sp = add("weights", "list the weight files cgn_dist uses (source, size, sha256, where, present?); "
             "`weights fetch NAME` downloads one")
    sp.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    sp.add_argument("names", nargs="*", help="weights to fetch (names from the listing)")
    sp.add_argument("--force", action="store_true", help="download again even when present")
    sp.set_defaults(fn=cmd_weights)

    argv, debug = _pop_debug(_drop_local_rank(sys.argv[1:] if argv is None else argv))
    debug = debug or bool(os.environ.get(DEBUG_ENV) or os.environ.get("CGN_DIST_TRACEBACK"))
    args = p.parse_args(argv)
    if getattr(args, "config_required", False) and args.config is None:
        sub.choices[args.cmd].error(f"a CONFIG is required: cgn-dist {args.cmd} CONFIG [key=value ...], e.g. "
                                    f"cgn-dist {args.cmd} {EXAMPLE_CONFIG.get(args.cmd, 'configs/main.yaml')}")
    _console_logging()
    try:
        return args.fn(args)
    except ConfigError as e:
        if debug:
            raise
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only the user's and the machine's errors; a bug is re-raised
        if debug or not (isinstance(e, UserError) or is_machine_error(e)):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:  # stopped at a safe point: say what was kept and how to go on
        if debug:
            raise
        print(interrupted_line(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a loop that can stop cleanly
        if debug:
            raise
        print("interrupted: stopped at once (what was complete on disk is kept; nothing half-written counts)",
              file=sys.stderr)
        return 130


def interrupted_line(e: Interrupted) -> str:
    if e.kind == "train":
        return (f"interrupted at update {e.done} of {e.total}; checkpoint saved in {e.where}; "
                "rerun the same command to resume")
    if e.kind == "generate":
        return f"interrupted: {e.done} of {e.total} shards committed in {e.where}; rerun the same command to finish"
    return "interrupted"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        # raised in a DataLoader worker: torch re-raises it with the worker's traceback as the message;
        # the last line is the error itself ("cgn_dist.data.shards.ShardFormatError: shard ... ")
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(f"{type(e).__module__}.{type(e).__name__}: ") else last
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
