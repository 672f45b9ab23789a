"""Shared test set-up: CPU only, loopback only, few threads, paths to the shared references."""
import os
from pathlib import Path

# Before torch / ray / deepspeed are imported by any test module.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Ray stays on 127.0.0.1: single-machine mode (no 8.8.8.8 probe), no usage stats,
# and a dead loopback proxy so its cloud-metadata probes fail at once.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
    os.environ[k] = "http://127.0.0.1:9"
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost,::1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CGN_DIST_SHARED_REF") or REPO.parent / "shared" / "reference")


@pytest.fixture(scope="session")
def shared_ref() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared reference folder {SHARED} is missing")
    return SHARED


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
