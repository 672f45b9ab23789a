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
# The tests' Ray instances keep their sessions in a folder of their own, so that at the end exactly
# those can be stopped (pytest_sessionfinish); the user's other Ray instances are never touched.
_OWN_RAY_TMPDIR = "RAY_TMPDIR" not in os.environ
if _OWN_RAY_TMPDIR:
    import tempfile

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cgn_dist_ray_", dir="/tmp")  # short: socket paths

# One thread here and in every child (CLI runs in subprocesses, pool workers): a run in a child and its
# reference computed in this process then round alike, so they can be compared bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# ../shared next to the repo; CGN_DIST_SHARED points elsewhere (a checkout that lives in a subfolder).
SHARED = Path(os.environ.get("CGN_DIST_SHARED", REPO.parent / "shared")) / "reference"


@pytest.fixture(scope="session")
def shared_ref() -> Path:
    # The package's own tests run from a source tarball without the references; those that compare with
    # the authors' checkpoints and goldens skip, saying why. In CI the references must be there.
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the shared reference folder {SHARED} is missing (CI needs it)")
        pytest.skip(f"needs the reference folder {SHARED} (set CGN_DIST_SHARED to its parent)")
    return SHARED


def pytest_collection_modifyitems(config, items):
    config._cgn_shared_tests = sum("shared_ref" in getattr(item, "fixturenames", ()) for item in items)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_cgn_shared_tests", 0)
    where = "present" if SHARED.is_dir() else "MISSING: they were skipped"
    terminalreporter.write_line(f"{n} tests read the shared references at {SHARED} ({where})")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_sessionfinish(session, exitstatus):
    # A safety net: fixtures shut their clusters down; whatever a failed test left behind under our own
    # RAY_TMPDIR is stopped here, by its command line (never `ray stop`, which stops every instance).
    if not _OWN_RAY_TMPDIR:
        return
    import shutil

    from cgn_dist.distributed.ray_utils import stop_ray_under

    left = stop_ray_under(os.environ["RAY_TMPDIR"])
    if left:
        print(f"\nstopped {len(left)} Ray processes the tests left behind")
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
