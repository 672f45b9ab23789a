"""The whole package's import graph, read from the source with ast (function-local imports included, which
the interpreter never sees at import time; ``if TYPE_CHECKING:`` blocks excluded, they never run): no circle
between any two modules, and no module importing its own package's ``__init__`` (re-exports are for users
outside the package)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((REPO / "cgn_dist").rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from pkg import sub`` names ``pkg.sub``)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    # `if TYPE_CHECKING:` imports exist for the type checker only, never at run time: not edges.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop(); on.discard(x); comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_circle_finder_finds_a_planted_circle():
    # The finder itself, on a hand-made graph: a -> b -> c -> a is one circle; d -> a is not part of it.
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_the_package():
    assert _circles(_graph()) == []


def test_no_module_imports_its_own_package_init():
    mods = _modules()
    bad = [f"{m} -> {t}" for m, deps in _graph().items() for t in deps
           if t != "cgn_dist" and mods[t].name == "__init__.py" and m.startswith(t + ".")]
    assert bad == []


# The declared order, lowest first: a module imports only from its own layer or a lower one (the same
# layer is allowed; a circle inside it is caught above). The most specific prefix names a module's layer.
LAYERS = [
    # 0: leaves every layer may use
    ("cgn_dist", "cgn_dist.errors", "cgn_dist.interrupts", "cgn_dist.progress", "cgn_dist.precision",
     "cgn_dist.storage", "cgn_dist.config_schema", "cgn_dist.config", "cgn_dist.distributed.env"),
    ("cgn_dist.data", "cgn_dist.weights"),  # 1: data sets, shard files, the weights registry
    ("cgn_dist.models", "cgn_dist.losses"),  # 2: networks and losses
    ("cgn_dist.distributed", "cgn_dist.sharding"),  # 3: engines, process groups, Ray; the shard engine
    ("cgn_dist.train", "cgn_dist.ingest"),  # 4: CGN training loops; image trees into shards
    ("cgn_dist.generate",),  # 5: counterfactual samplers and the generate command
    ("cgn_dist.classifier",),  # 6: the MNIST and ImageNet classifier experiments
    ("cgn_dist.pipelines", "cgn_dist.launchers"),  # 7: end-to-end recipes; what starts a loop
    ("cgn_dist.api", "cgn_dist.bench", "cgn_dist.doctor", "cgn_dist.doctor_checks", "cgn_dist.cli"),  # 8
]


def _layer(module: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    assert best is not None, f"{module} has no declared layer: add its package to LAYERS"
    return best


def test_every_import_follows_the_layer_order():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, deps in _graph().items() for t in deps if _layer(t) > _layer(m)]
    assert bad == []


def test_the_layer_check_catches_an_upward_import():
    assert _layer("cgn_dist.data.stream") < _layer("cgn_dist.train.mnist")  # so data -> train would be flagged
    assert _layer("cgn_dist.distributed.env") == 0 < _layer("cgn_dist.distributed.engine")
