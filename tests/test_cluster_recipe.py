"""The shipped cluster recipe runs the shipped cluster configs: every worker they ask for fits a node type of
launch/ray_cluster.yaml (a job whose workers fit no node waits forever), storage is a real shared mount with
the weights cache on it, and every node installs the torch that launch/setup.sh pins."""
import re
from pathlib import Path

import yaml

from cgn_dist import weights
from cgn_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = yaml.safe_load((REPO / "launch" / "ray_cluster.yaml").read_text())
CLUSTER_CONFIGS = sorted((REPO / "configs").rglob("cluster*.yaml"))


def _node_types():
    return {name: dict(t.get("resources", {}), max_workers=t.get("max_workers", 0))
            for name, t in RECIPE["available_node_types"].items() if name != RECIPE["head_node_type"]}


def test_there_are_cluster_configs_to_check():
    assert CLUSTER_CONFIGS, "no configs/**/cluster*.yaml"


def test_every_cluster_config_fits_a_node_type():
    for path in CLUSTER_CONFIGS:
        d = load_config(path, []).distributed
        cpu, gpu = d.cpus_per_worker, 1 if d.use_gpu else 0
        fits = []
        for name, node in _node_types().items():
            per_node = min(node.get("CPU", 0) // cpu if cpu else 10**9, node.get("GPU", 0) // gpu if gpu else 10**9)
            if per_node >= 1 and per_node * node["max_workers"] >= d.num_workers:
                fits.append(name)
        assert fits, f"{path.name}: {d.num_workers} workers of {cpu} CPU + {gpu} GPU fit no node type"


def test_a_worker_that_fits_nowhere_is_caught():
    # The check itself, on the recipe as it was: g5.xlarge (4 vCPU, 1 GPU) cannot host 8 CPUs per GPU worker.
    node = {"CPU": 4, "GPU": 1, "max_workers": 8}
    assert min(node["CPU"] // 8, node["GPU"] // 1) == 0


def test_storage_is_a_shared_mount_with_the_weights_cache_on_it():
    init = "\n".join(RECIPE["initialization_commands"])
    assert "mount -t nfs4" in init and "mountpoint -q /shared ||" in init and "exit 1" in init
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("CGN_DIST_CACHE=/shared/cache" in c and "ray start" in c for c in RECIPE[key]), key
    fetched = " ".join(RECIPE["head_setup_commands"])
    names = re.search(r"cgn-dist weights fetch (.+)", fetched).group(1).split()
    assert names and all(n in weights.REGISTRY for n in names)


def test_every_node_installs_the_pinned_torch():
    pins = re.findall(r"torch==[\d.]+ torchvision==[\d.]+", (REPO / "launch" / "setup.sh").read_text())
    assert pins and any(pins[0] in c for c in RECIPE["setup_commands"])


def test_gpu_peaks_match_the_most_specific_card_name():
    from cgn_dist.generate.speed import peak_bf16_tflops

    # Data-sheet dense bf16 peaks: H200 NVL 835, H200 SXM 989, H100 PCIe 756, H100 NVL 835, H100 SXM 989.
    assert peak_bf16_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("Tesla T4") is None
