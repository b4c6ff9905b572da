#!/usr/bin/env python3
"""flowdiff vs PyTorch eager on the same GPU: the training step and the sampling throughput of the
MLP (4 x 256, SiLU, d = 2) and of the U-Net (channels [32, 64, 128], 2 residual layers,
embeddings 40, 1 x 32 x 32, 10 classes), and fp32 GEMM, in the configurations of the CPU
comparison (benchmarks/pytorch_compare.py, whose PyTorch modules from tools/fixtures are imported
here) and of bench_cuda's model benchmarks (benchmarks/bench_cuda.cu).

It alternates, round by round, PyTorch in this process and the C++ binary bench_cuda
(--benchmark_format=json, a filter for the figures compared), and prints the median of each
figure over the rounds and the ratio flowdiff / PyTorch of the rates (> 1: flowdiff is faster;
issue 6's target is >= 1.0). Both sides compute in full fp32: TF32 is off in PyTorch (matmul and
cuDNN), as it is in flowdiff's cuBLAS handle.

What each side does per timed call (CUDA events around each call, as bench_cuda's run_timed):
- training step: on a fixed data batch z on the GPU, t ~ U[0, 1], eps ~ N(0, I),
  x_t = t z + (1 - t) eps, target z - eps, CFG dropout 0.1 of the labels (conditional models),
  forward, mean squared error, backward, AdamW (lr 1e-4, weight decay 1e-2), and the loss read on
  the host (flowdiff's objective checks it every step). No clipping, no EMA.
- sampling: Heun with uniform steps from t = 0 to 1, two network evaluations per step, plain
  (the null label) or under CFG with w = 3 (one evaluation of the 2N batch [x; x] with labels
  [y; null] per field call); PyTorch under torch.no_grad(). Each call restarts from the same noise.
- GEMM: C = A B, n x n x n fp32 (torch.mm; flowdiff's row-major wrapper of cublasSgemm).

Usage, on the GPU machine (from the repository root, bench_cuda prebuilt: scripts/gpu_build.sh):
  python3 benchmarks/pytorch_compare_cuda.py --bench build/gpu/carry/bin/bench_cuda \\
      --rounds 3 --json out/torch.json
Without a GPU, --dry-run prints the cases and the bench_cuda command without running anything,
and --torch-only --device cpu runs the PyTorch side on the CPU (a smoke test of this script).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NUM_CLASSES = 10
CFG_W = 3.0


# One row per compared figure: key, flowdiff benchmark (without Google Benchmark's
# "/manual_time" suffix), the counter compared, its unit, the PyTorch case.
CASES = [
    ("mlp_train/1024", "BM_cuda_mlp_train/1024", "steps_per_s", "steps/s",
     ("train", "mlp", 1024)),
    ("mlp_sample_heun50/1024", "BM_cuda_mlp_sample_heun50/1024", "samples_per_s", "samples/s",
     ("sample", "mlp", 1024, 50, False)),
    ("mlp_sample_heun50/65536", "BM_cuda_mlp_sample_heun50/65536", "samples_per_s", "samples/s",
     ("sample", "mlp", 65536, 50, False)),
    ("mlp_sample_heun50_cfg/1024", "BM_cuda_mlp_sample_heun50_cfg/1024", "samples_per_s",
     "samples/s", ("sample", "mlp", 1024, 50, True)),
    ("mlp_sample_heun50_cfg/65536", "BM_cuda_mlp_sample_heun50_cfg/65536", "samples_per_s",
     "samples/s", ("sample", "mlp", 65536, 50, True)),
    ("unet_train/64", "BM_cuda_unet_train/64", "steps_per_s", "steps/s", ("train", "unet", 64)),
    ("unet_train/250", "BM_cuda_unet_train/250", "steps_per_s", "steps/s", ("train", "unet", 250)),
    ("unet_sample_heun10_cfg/64", "BM_cuda_unet_sample_heun10_cfg/64", "nfe_per_s",
     "evals/s (2N batch)", ("sample", "unet", 64, 10, True)),
    ("unet_sample_heun10_cfg/250", "BM_cuda_unet_sample_heun10_cfg/250", "nfe_per_s",
     "evals/s (2N batch)", ("sample", "unet", 250, 10, True)),
    ("sgemm/1024", "BM_cublas_sgemm/1024", "GFLOP/s", "GFLOP/s", ("gemm", 1024)),
    ("sgemm/4096", "BM_cublas_sgemm/4096", "GFLOP/s", "GFLOP/s", ("gemm", 4096)),
]
GROUPS = ("mlp", "unet", "gemm")


def group_of(key):
    return "gemm" if key.startswith("sgemm") else key.split("_", 1)[0]


def bench_filter(groups):
    """The --benchmark_filter regex selecting the compared flowdiff benchmarks."""
    parts = [f"cuda_{g}_" for g in groups if g != "gemm"]
    if "gemm" in groups:
        parts.append("cublas_sgemm")
    return "^BM_(" + "|".join(parts) + ")"


def bench_command(bench, groups, min_time):
    # Google Benchmark 1.7 (the library bench_cuda is built against) takes --benchmark_min_time
    # as plain seconds.
    return [bench, f"--benchmark_filter={bench_filter(groups)}", "--benchmark_format=json",
            f"--benchmark_min_time={min_time}"]


def parse_bench_json(text):
    """{benchmark name without the time suffix: {counter: value}} from bench_cuda's JSON output;
    a clear error when the binary skipped (no GPU) or printed something else."""
    start = text.find("{")
    if start < 0:
        raise RuntimeError("bench_cuda printed no JSON (did it skip for lack of a GPU?): "
                           + text.strip()[:500])
    doc = json.loads(text[start:])
    out = {}
    for b in doc.get("benchmarks", []):
        if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
            continue
        name = b["name"]
        for suffix in ("/manual_time", "/real_time", "/process_time"):
            name = name.replace(suffix, "")
        out[name] = b
    return doc.get("context", {}), out


def cpp_figures(bench, groups, min_time):
    cmd = bench_command(bench, groups, min_time)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {r.returncode}:\n"
                           f"{r.stderr[-3000:]}")
    context, runs = parse_bench_json(r.stdout)
    f = {}
    for key, name, counter, _unit, _case in CASES:
        if group_of(key) in groups and name in runs and counter in runs[name]:
            f[key] = float(runs[name][counter])
    return context, f


# ---------------------------------------------------------------------------------------------
# The PyTorch side (torch is imported only here, so --help and --dry-run work without it).

def import_torch():
    import torch  # noqa: F401
    # pytorch_compare.py defines the CPU comparison's models from tools/fixtures; importing it
    # sets the OpenBLAS core type and OpenMP waiting for its CPU runs, which do not matter here.
    import pytorch_compare
    return torch, pytorch_compare


def setup_torch(device):
    torch, pc = import_torch()
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"pytorch_compare_cuda.py: no CUDA device visible to PyTorch {torch.__version__} "
                 f"(torch.cuda.is_available() is False; CUDA build: {torch.version.cuda}). Run it "
                 "on the GPU machine, or use --dry-run / --torch-only --device cpu to check it.")
    # Full fp32, as flowdiff: no TF32 in matrix products nor in cuDNN's convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False  # eager defaults otherwise
    return torch, pc


def make_model(torch, pc, kind, conditional, device):
    """The CPU comparison's modules: make_unet() (conditional, 10 classes); make_mlp() for MLP
    training (unconditional, as bench_nn), and the same MLP with 10 classes for sampling, so that
    CFG has labels (bench_cuda does the same)."""
    torch.manual_seed(0)
    if kind == "unet":
        m = pc.make_unet()
    elif conditional:
        m = pc.MLP(2, 256, 4, 64, NUM_CLASSES)
    else:
        m = pc.make_mlp()
    return m.to(device)


def shape_of(kind, n):
    return (n, 2) if kind == "mlp" else (n, 1, 32, 32)


class Timer:
    """Seconds per call: CUDA events around each call (the host waits for the stop event, as
    bench_cuda's run_timed does), after one warm-up call; wall clock on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def __call__(self, fn, min_time, min_iters=2):
        torch = self.torch
        fn()  # warm-up: allocator, cuBLAS/cuDNN handles and heuristics
        total, n = 0.0, 0
        if self.device == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
        while n < min_iters or total < min_time:
            if self.device == "cuda":
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                total += start.elapsed_time(stop) * 1e-3
            else:
                t0 = time.perf_counter()
                fn()
                total += time.perf_counter() - t0
            n += 1
        return total / n


class TrainStep:
    def __init__(self, torch, pc, kind, n, device):
        self.torch = torch
        self.conditional = kind == "unet"  # the MLP trains unconditional, as on the CPU
        self.model = make_model(torch, pc, kind, self.conditional, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-2)
        g = torch.Generator(device=device).manual_seed(7)
        self.z = torch.randn(shape_of(kind, n), generator=g, device=device)
        self.y = (torch.arange(n, device=device) % NUM_CLASSES).int()
        self.null = torch.full_like(self.y, NUM_CLASSES)

    def __call__(self):
        torch, z = self.torch, self.z
        n = z.shape[0]
        t = torch.rand(n, device=z.device)
        eps = torch.randn_like(z)
        tt = t.view(n, *([1] * (z.dim() - 1)))
        xt = tt * z + (1 - tt) * eps  # the linear schedule: alpha_t = t, beta_t = 1 - t
        target = z - eps
        y = None
        if self.conditional:
            y = torch.where(torch.rand(n, device=z.device) < 0.1, self.null, self.y)
        out = self.model(xt, t, y)
        loss = torch.mean((out - target) ** 2)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        return loss.item()


class Sampler:
    def __init__(self, torch, pc, kind, n, steps, guided, device, model):
        self.torch, self.model, self.guided = torch, model, guided
        g = torch.Generator(device=device).manual_seed(9)
        self.x0 = torch.randn(shape_of(kind, n), generator=g, device=device)
        y = (torch.arange(n, device=device) % NUM_CLASSES).int()
        null = torch.full_like(y, NUM_CLASSES)
        self.y2 = torch.cat([y, null])  # CFG's 2N batch: [x; x] with labels [y; null]
        self.null = null
        # flowdiff's uniform_grid: steps + 1 points from 0 to 1.
        self.grid = [i / steps for i in range(steps + 1)]

    def field(self, x, t):
        torch = self.torch
        n = x.shape[0]
        if not self.guided:
            return self.model(x, torch.full((n,), t, device=x.device), self.null)
        out = self.model(torch.cat([x, x]), torch.full((2 * n,), t, device=x.device), self.y2)
        cond, uncond = out[:n], out[n:]
        return (1 - CFG_W) * uncond + CFG_W * cond

    def __call__(self):
        with self.torch.no_grad():
            x = self.x0.clone()
            for t0, t1 in zip(self.grid[:-1], self.grid[1:]):
                h = t1 - t0
                k1 = self.field(x, t0)
                k2 = self.field(x + h * k1, t0 + h)
                x = x + (h / 2) * (k1 + k2)
            return x


def torch_figures(torch, pc, groups, device, min_time, min_iters, models):
    """{key: rate} with the rate in the unit of CASES' counter."""
    timer = Timer(torch, device)
    f = {}
    for key, _name, counter, _unit, case in CASES:
        if group_of(key) not in groups:
            continue
        if case[0] == "train":
            _, kind, n = case
            step = models.setdefault(("train", kind, n),
                                     TrainStep(torch, pc, kind, n, device))
            sec = timer(step, min_time, min_iters)
            f[key] = 1.0 / sec if counter == "steps_per_s" else n / sec
        elif case[0] == "sample":
            _, kind, n, steps, guided = case
            model = models.setdefault(("model", kind),
                                      make_model(torch, pc, kind, True, device).eval())
            sampler = Sampler(torch, pc, kind, n, steps, guided, device, model)
            sec = timer(sampler, min_time, min_iters)
            f[key] = n / sec if counter == "samples_per_s" else 2 * steps / sec
        else:
            _, n = case
            g = torch.Generator(device=device).manual_seed(3)
            a = torch.rand((n, n), generator=g, device=device) * 2 - 1
            b = torch.rand((n, n), generator=g, device=device) * 2 - 1
            c = torch.empty((n, n), device=device)
            sec = timer(lambda: torch.mm(a, b, out=c), min_time, min_iters)
            f[key] = 2.0 * n ** 3 / sec * 1e-9
    return f


# ---------------------------------------------------------------------------------------------

def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def summarise(runs_t, runs_c, groups):
    """Medians over rounds and ratios, one dict per compared figure."""
    rows = []
    for key, name, counter, unit, _case in CASES:
        if group_of(key) not in groups:
            continue
        tv = [r[key] for r in runs_t if key in r]
        cv = [r[key] for r in runs_c if key in r]
        tm = statistics.median(tv) if tv else None
        cm = statistics.median(cv) if cv else None
        ratio = cm / tm if tm and cm else None
        rows.append({"figure": key, "flowdiff_benchmark": name, "counter": counter, "unit": unit,
                     "pytorch": tm, "flowdiff": cm, "ratio": ratio,
                     "pytorch_rounds": tv, "flowdiff_rounds": cv})
    return rows


def table(rows):
    lines = ["| figure | unit | PyTorch | flowdiff | flowdiff / PyTorch |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        lines.append(f"| {r['figure']} | {r['unit']} | {fmt(r['pytorch'])} | "
                     f"{fmt(r['flowdiff'])} | {ratio} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(
        description="flowdiff vs PyTorch eager on the same GPU: MLP and U-Net training steps and "
        "sampling throughput, fp32 GEMM (bench_cuda against PyTorch, alternating rounds).",
        epilog="Ratios > 1 favour flowdiff; issue 6's target is >= 1.0 (PyTorch eager).")
    ap.add_argument("--bench", default="build/gpu/carry/bin/bench_cuda",
                    help="the bench_cuda binary (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds of timed calls per figure and round, each side (default 0.5)")
    ap.add_argument("--min-iters", type=int, default=2,
                    help="PyTorch: at least this many timed calls per figure (default 2)")
    ap.add_argument("--models", default="mlp,unet,gemm",
                    help="comma-separated subset of mlp, unet, gemm (default: all)")
    ap.add_argument("--json", metavar="FILE", help="write the figures, rounds and ratios here")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="PyTorch's device; cpu only with --torch-only, to check this script")
    ap.add_argument("--torch-only", action="store_true",
                    help="run only the PyTorch side (no bench_cuda)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the cases and the bench_cuda command, run nothing")
    a = ap.parse_args()
    groups = [g for g in a.models.split(",") if g]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        ap.error(f"--models: unknown {bad}; choose from {', '.join(GROUPS)}")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    if a.device == "cpu" and not a.torch_only and not a.dry_run:
        ap.error("--device cpu needs --torch-only (flowdiff's side is bench_cuda, on the GPU)")

    if a.dry_run:
        print("figures compared (flowdiff benchmark, counter):")
        for key, name, counter, unit, case in CASES:
            if group_of(key) in groups:
                print(f"  {key}: {name} [{counter}, {unit}]; PyTorch case {case}")
        print("bench_cuda command:", " ".join(bench_command(a.bench, groups, a.min_time)))
        print(f"bench_cuda present: {os.path.isfile(a.bench) and os.access(a.bench, os.X_OK)}")
        return 0

    if not a.torch_only and not (os.path.isfile(a.bench) and os.access(a.bench, os.X_OK)):
        sys.exit(f"pytorch_compare_cuda.py: bench_cuda not found or not executable at {a.bench} "
                 "(build it with scripts/gpu_build.sh, or pass --bench)")
    torch, pc = setup_torch(a.device)
    dev_name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {dev_name}, "
          f"TF32 off, bench {a.bench if not a.torch_only else '(not run)'}, rounds {a.rounds}, "
          f"min time {a.min_time} s", flush=True)

    runs_t, runs_c, context, models = [], [], {}, {}
    for r in range(a.rounds):
        t0 = time.perf_counter()
        runs_t.append(torch_figures(torch, pc, groups, a.device, a.min_time, a.min_iters, models))
        if not a.torch_only:
            if a.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # give bench_cuda the memory PyTorch cached
            context, f = cpp_figures(a.bench, groups, a.min_time)
            runs_c.append(f)
        print(f"round {r + 1}/{a.rounds} done in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = summarise(runs_t, runs_c, groups)
    print()
    print("Rates, median over rounds; ratio = flowdiff / PyTorch (> 1: flowdiff is faster).")
    print()
    print(table(rows))
    if a.json:
        doc = {"device": dev_name, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "tf32": False, "rounds": a.rounds, "min_time": a.min_time, "bench": a.bench,
               "bench_context": context, "figures": rows}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"\nwrote {a.json}")
    missing = [r["figure"] for r in rows if r["flowdiff"] is None and not a.torch_only]
    if missing:
        print(f"\nmissing from bench_cuda's output: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
