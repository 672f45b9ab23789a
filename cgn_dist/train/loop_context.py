"""What every training loop opens and must close on every way out (a result, an exception, Ctrl-C): the
process group when this loop started it, the run directory (config resolved and saved, resume checked),
its log file and the scalar/image logger."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cgn_dist.config import Config
from cgn_dist.distributed.env import DistEnv, destroy_process_group, init_process_group
from cgn_dist.train.checkpoint import prepare_run_dir
from cgn_dist.train.metrics import build_logger, setup_logging


@contextlib.contextmanager
def loop_context(cfg: Config, env: DistEnv) -> Iterator[tuple[Path, Any]]:
    """(run_dir, logger) for a loop's body; the logger closed and an own process group destroyed after."""
    owns_group = init_process_group(env)  # torchrun / deepspeed launchers; Ray Train made its own
    logger = None
    try:
        run_dir = prepare_run_dir(cfg, env.is_main, env.device)
        setup_logging(run_dir, env.is_main)
        logger = build_logger(run_dir, env.is_main)
        yield run_dir, logger
    finally:
        if logger is not None:
            logger.close()
        if owns_group:
            destroy_process_group()
