"""The speed of cgn_dist's steps on three classes of CPU, measured on one machine in one run.

    PYTHONPATH=. python benchmarks/cpu_classes.py [--threads 2] [--quick] [--classes amx,avx512,avx2]
        [--json benchmarks/results/cpu_classes_latest.json] [--md FILE]

oneDNN (the convolution library inside torch) reads ONEDNN_MAX_CPU_ISA once, at its first use, and then
uses no instruction set above it. So any machine stands in for a weaker one:
  amx       no cap: what this machine has (AMX tiles on Sapphire Rapids and later: bf16 matrix unit);
  avx512    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16: AVX-512 with bf16 dot products but no AMX (Cooper Lake,
            Ice Lake / Zen 4 class servers, and VMs whose hypervisor hides AMX);
  avx2      ONEDNN_MAX_CPU_ISA=AVX2: a laptop or desktop without AVX-512 (most AMD Zen 2/3, Intel consumer
            chips); bf16 is emulated there.
Each benchmark runs as a child process per class (the cap needs a fresh process), the classes interleaved
benchmark by benchmark (mnist under amx, avx512, avx2, then generation under each, ...), so drifting load on
a shared machine hits every class alike. Every figure is a ratio within one child (interleaved rounds
inside it), never across children:
  mnist       benchmarks/bench_mnist_update.py (colored, batch 16): the authors' update vs ours plain (fp32),
              fast in fp32 and fast in bf16; "auto" is the fast step mnist.precision=auto picks there;
  generation  benchmarks/bench_generate_speed.py at full size (BigGAN-deep-256 x 3 + U²-Net, random init):
              the authors' path vs our engine in fp32 and bf16; auto = generate.precision=auto's pick;
  classifier  benchmarks/bench_classifier_step.py: one invariant ResNet-50 update (B real + B counterfactual
              images, 224 px) in fp32 and bf16 autocast; auto = train.precision=auto's pick.
Then the MNIST update once more at 1 thread without a cap: the thread scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (("amx", None), ("avx512", "AVX512_CORE_BF16"), ("avx2", "AVX2"))
LABELS = {"amx": "no cap (this CPU)", "avx512": "AVX512_CORE_BF16 (no AMX)", "avx2": "AVX2 (laptop)"}


def _child(script: str, args: list[str], cap: str | None, threads: int, out: Path, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("DNNL_MAX_CPU_ISA", None)
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--threads", str(threads), "--json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} under {cap or 'no cap'} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="cpu_classes_"))
    n = 2 if args.quick else args.images
    benches = {
        "mnist": ("bench_mnist_update.py", ["--datasets", "colored", "--updates", str(2 if args.quick else 5),
                                            "--rounds", str(2 if args.quick else 5)]),
        "generation": ("bench_generate_speed.py", (["--tiny"] if args.quick else []) + [
            "--n", str(n), "--batch", str(n), "--rounds", str(1 if args.quick else args.gen_rounds),
            "--variants", "fp32,bf16"]),
        "classifier": ("bench_classifier_step.py", ["--batch", str(args.classifier_batch), "--steps",
                                                    str(1 if args.quick else 2)]
                       + (["--size", "64"] if args.quick else [])),
    }
    results: dict = {"threads": args.threads, "cpu": _cpu_name(), "classes": {}, "started": time.ctime()}
    if args.merge and args.json and Path(args.json).is_file():  # a run cut short: keep what it measured
        results = json.loads(Path(args.json).read_text())
    classes = [(c, cap) for c, cap in CLASSES if c in args.classes.split(",")]
    for bench, (script, bargs) in benches.items():
        if bench not in args.benches.split(","):
            continue
        for cls, cap in classes:
            print(f"{bench} under {LABELS[cls]} ...", flush=True)  # the uncapped label is refined in the table
            res = _child(script, bargs, cap, args.threads, tmp / f"{bench}_{cls}.json", args.timeout)
            results["classes"].setdefault(cls, {"cap": cap})[bench] = res
            print(f"  {summary_line(bench, res)}  ({res['wall_s']:.0f} s)", flush=True)
            _dump(results, args)
    if not args.quick and "threads" in args.benches.split(","):
        print("mnist at 1 thread, no cap (thread scaling) ...", flush=True)
        results["mnist_1_thread"] = _child(*benches["mnist"], None, 1, tmp / "mnist_1t.json", args.timeout)
        _dump(results, args)
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"unknown ({os.cpu_count()} logical CPUs)"


def _uncapped_label(c: dict) -> str:
    """The uncapped row names what this CPU is: it stands for the AMX class only where it has AMX."""
    caps = (c.get("mnist") or {}).get("rows", [{}])[0].get("capabilities") or {}
    if caps.get("amx"):
        return "no cap (this CPU: AMX)"
    if caps.get("avx512_bf16"):
        return "no cap (this CPU: AVX-512 BF16, no AMX)"
    return "no cap (this CPU)" if not caps else "no cap (this CPU: no AVX-512 BF16)"


def _mnist(res: dict) -> dict:
    row = res["rows"][0]
    return {"auto": row["auto_precision"], "s": row["sec_per_update"], "x": row["speedup_vs_authors"]}


def _gen(res: dict) -> dict:
    rows = {r["variant"]: r for r in res["rows"]}
    a = rows.get("(a) authors' path", {}).get("s_per_img")
    out = {"auto": res["auto_precision"], "authors_s": a}
    for v in ("fp32", "bf16"):
        out[f"{v}_s"] = rows[v]["engine_s_per_img"]
        out[f"{v}_x"] = rows[v].get("engine_vs_authors")
    return out


def _cls(res: dict) -> dict:
    """fp32 / bf16 in the layout the training loop uses there (use_channels_last), NCHW for older files."""
    def layout(p: str) -> str:
        if p in res:  # written before the layouts were timed apart
            return p
        return f"{p}_cl" if res.get("use_channels_last", {}).get(p) else f"{p}_nchw"

    fp32, bf16 = res[layout("fp32")]["s_per_step_median"], res[layout("bf16")]["s_per_step_median"]
    return {"auto": res["auto_precision"], "fp32_s": fp32, "bf16_s": bf16, "bf16_x": round(fp32 / bf16, 2),
            "channels_last_x": res.get("channels_last_speedup", {})}


def summary_line(bench: str, res: dict) -> str:
    if bench == "mnist":
        m = _mnist(res)
        return (f"authors {m['s']['authors']:.3f} s; plain {m['x']['plain']:.2f}x, fast fp32 {m['x']['fast_fp32']:.2f}x,"
                f" fast bf16 {m['x']['fast_bf16']:.2f}x; auto = {m['auto']} ({m['x']['auto']:.2f}x)")
    if bench == "generation":
        g = _gen(res)
        return (f"authors {g['authors_s']:.2f} s/img; fp32 {g['fp32_s']:.2f} ({g['fp32_x']:.2f}x), bf16 "
                f"{g['bf16_s']:.2f} ({g['bf16_x']:.2f}x); auto = {g['auto']}")
    c = _cls(res)
    return (f"fp32 {c['fp32_s']:.2f} s/step, bf16 {c['bf16_s']:.2f} ({c['bf16_x']:.2f}x fp32); auto = {c['auto']};"
            f" channels-last vs NCHW {c['channels_last_x']}")


def table(results: dict) -> str:
    """The markdown table (docs/cpu_classes.md holds one per machine measured)."""
    lines = [f"CPU: {results['cpu']}; {results['threads']} torch thread(s); run {results['started']}.",
             "x = the authors' time / ours (MNIST update, generation engine) or fp32 time / bf16 time (classifier), "
             "each measured within one child process with interleaved rounds; **auto** = what precision=auto "
             "picks there and its figure.", "",
             "| oneDNN | MNIST update: authors s | plain x | fast fp32 x | fast bf16 x | **auto** | "
             "generation: authors s/img | fp32 x | bf16 x | **auto** | ResNet-50 step fp32 s | bf16 / fp32 | **auto** |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cls, _ in CLASSES:
        c = results["classes"].get(cls, {})
        cells = [LABELS[cls] if cls != "amx" else _uncapped_label(c)]
        if "mnist" in c:
            m = _mnist(c["mnist"])
            cells += [f"{m['s']['authors']:.3f}", f"{m['x']['plain']:.2f}", f"{m['x']['fast_fp32']:.2f}",
                      f"{m['x']['fast_bf16']:.2f}", f"**{m['auto']} {m['x']['auto']:.2f}x**"]
        else:
            cells += ["–"] * 5
        if "generation" in c:
            g = _gen(c["generation"])
            pick = g[f"{g['auto']}_x"]
            cells += [f"{g['authors_s']:.2f}", f"{g['fp32_x']:.2f}", f"{g['bf16_x']:.2f}", f"**{g['auto']} {pick:.2f}x**"]
        else:
            cells += ["–"] * 4
        if "classifier" in c:
            k = _cls(c["classifier"])
            pick = 1.0 if k["auto"] == "fp32" else k["bf16_x"]
            cells += [f"{k['fp32_s']:.2f}", f"{k['bf16_x']:.2f}", f"**{k['auto']} {pick:.2f}x fp32**"]
        else:
            cells += ["–"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    if "mnist_1_thread" in results and "mnist" in results["classes"].get("amx", {}):
        one, two = _mnist(results["mnist_1_thread"]), _mnist(results["classes"]["amx"]["mnist"])
        lines += ["", "Threads (no cap, MNIST update s): " + ", ".join(
            f"{k} {one['s'][k]:.3f} at 1 -> {two['s'][k]:.3f} at {results['threads']} "
            f"({one['s'][k] / two['s'][k]:.2f}x)" for k in ("authors", "plain", "fast_fp32", "fast_bf16"))]
    return "\n".join(lines) + "\n"


def _dump(results: dict, args) -> None:  # after every child: a run cut short keeps what it measured
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text("# Speed per CPU class\n\nMade by `python benchmarks/cpu_classes.py` (see its "
                                 "docstring for what each column times).\n\n" + table(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    ap.add_argument("--images", type=int, default=2, help="generation: images per round (= forward batch)")
    ap.add_argument("--classes", default="amx,avx512,avx2",
                    help="which of amx (no cap), avx512, avx2 to run; on a CPU without AVX-512 a cap above AVX2 "
                         "changes nothing, so --classes amx measures it once")
    ap.add_argument("--benches", default="mnist,generation,classifier,threads",
                    help="which of mnist, generation, classifier, threads (the MNIST update at 1 thread) to run")
    ap.add_argument("--merge", action="store_true",
                    help="add to the figures already in --json (e.g. the benchmarks a run cut short missed)")
    ap.add_argument("--gen-rounds", type=int, default=2)
    ap.add_argument("--classifier-batch", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing in a minute")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    ap.add_argument("--json", default="benchmarks/results/cpu_classes_latest.json")
    ap.add_argument("--md", default="", help="also write the table here (docs/cpu_classes.md keeps the tables of "
                                             "every machine measured, with notes: not overwritten by default)")
    args = ap.parse_args()
    results = run(args)
    print("\n" + table(results))


if __name__ == "__main__":
    main()
