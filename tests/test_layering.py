"""No import circles between layers: training loops know nothing of their launcher, Ray helpers nothing of
generation (checked in a fresh interpreter, where nothing else has been imported yet)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHECK = """
import sys
import cgn_dist.train.mnist, cgn_dist.train.imagenet, cgn_dist.classifier.imagenet.train
assert "cgn_dist.launchers.ray_train" not in sys.modules, "a training loop imports its launcher"
import cgn_dist.distributed.ray_utils as ru
print(ru.package_root())
print(sorted(m for m in sys.modules if m.startswith("cgn_dist.generate")))
"""


def test_loops_do_not_import_their_launcher_and_ray_utils_not_generate():
    proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root, generate_modules = proc.stdout.strip().splitlines()
    assert Path(root) == REPO and generate_modules == "[]"
