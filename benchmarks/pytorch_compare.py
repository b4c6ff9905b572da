#!/usr/bin/python3
"""flowdiff vs PyTorch on the same CPU: the MLP (4 x 256, SiLU, d = 2), the 6.S184-style U-Net
(channels [32, 64, 128], 2 residual layers, embeddings 40, 1 x 32 x 32, 10 classes), a small DiT
(1 x 32 x 32, patch 4 or 2, width 128, depth 6, 4 heads, MLP ratio 4, 10 classes) and its
multi-head self-attention layer (timm's Attention: qkv and output projections), the same
architectures as tools/fixtures/mlp.py, unet.py and dit.py (imported from there).

It alternates, round by round, PyTorch (torch.set_num_threads(threads)) and the C++ benchmark
binary (bench_nn, --benchmark_format=json, OMP_NUM_THREADS=threads), and prints the median of
each figure over the rounds, wall time and process CPU time (all threads) per training step or
forward call, and the ratios PyTorch / flowdiff (> 1: flowdiff is faster; for training steps this
is the ratio of steps/s flowdiff / PyTorch). On a shared machine the CPU-time ratio says what the
work costs; the wall-time ratio also depends on the share of the cores each process was given. One training step is
forward, MSE loss gradient, backward, AdamW (lr 1e-4, weight decay 1e-2) in both. PyTorch's
forward latency is measured under torch.no_grad() (its best case); flowdiff's forward always
fills the cache for backward.

Attention backward in PyTorch is timed as repeated backward passes through one retained graph
(loss = sum(dy * y)), i.e. without the forward; attention forward, like every forward, runs
under torch.no_grad().

With --memory it also runs N U-Net training steps at batch 250 and N DiT (patch 4) training
steps at batch 64 and 256 in each under /usr/bin/time -v and prints the maximum resident set
sizes (bench_nn --train=unet|dit; this script's --train-driver).

Usage (from the repository root, after building bench_nn in Release):
  /usr/bin/python3 benchmarks/pytorch_compare.py --bench build/release/benchmarks/bench_nn \\
      --rounds 3 --threads 2 --memory
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools", "fixtures"))


def _early_wait_policy():
    """--wait-policy, read before torch is imported (libgomp reads OMP_WAIT_POLICY at load)."""
    for i, a in enumerate(sys.argv):
        if a.startswith("--wait-policy="):
            return a.split("=", 1)[1]
        if a == "--wait-policy" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "best"


# OpenMP waiting (libgomp reads OMP_WAIT_POLICY once, at load). PASSIVE: waiting threads sleep at
# once, so every parallel region pays an OS wake-up (up to a millisecond on a virtual machine);
# unset ("default"): they spin for a while first, which is faster for back-to-back regions but
# keeps a core busy after the work. The two libraries differ in which suits them: Debian's PyTorch
# runs its GEMMs on OpenBLAS's own (spinning) threads next to its OpenMP threads, and spinning
# OpenMP threads then fight OpenBLAS's for the cores (its MLP and DiT steps were 2-3x slower
# without PASSIVE, here), while flowdiff runs everything on the OpenMP threads and loses 2x to the
# wake-ups under PASSIVE (MLP step 11 -> 24 ms, DiT 310 -> 600 ms in alternating runs).
#   best (the default): each side at its better policy, PyTorch passive, flowdiff default;
#   passive / default: both sides the same.
# Never ACTIVE: the Python process stays alive while bench_nn runs, and its torch threads would
# spin on one of the cores all the time.
WAIT_POLICY = _early_wait_policy()
TORCH_POLICY = "default" if WAIT_POLICY == "default" else "passive"
FLOWDIFF_POLICY = "passive" if WAIT_POLICY == "passive" else "default"
if TORCH_POLICY == "passive":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
else:
    os.environ.pop("OMP_WAIT_POLICY", None)


def flowdiff_env(threads):
    """The environment of bench_nn: OMP_NUM_THREADS and flowdiff's wait policy."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if FLOWDIFF_POLICY == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def _openblas_core():
    """The OpenBLAS kernel PyTorch (Debian's, built on OpenBLAS) gets on this CPU. OpenBLAS 0.3.21
    picks its kernels from the CPUID model and falls back to the generic SSE3 'Prescott' kernel
    for a model it does not know, which some virtual machines report even on AVX-512 CPUs (e.g.
    a Sapphire Rapids that shows up as "Intel(R) Xeon(R) Processor"): PyTorch's GEMM then runs
    at a quarter of its speed (1024^3: 45 instead of 200 GFLOP/s on 2 threads). A fair baseline
    needs PyTorch's best kernel, so unless OPENBLAS_CORETYPE is set already, it is set from the
    CPU's flags: SkylakeX with AVX-512F, Haswell with AVX2. Returns the choice ('' if none)."""
    if os.environ.get("OPENBLAS_CORETYPE"):
        return os.environ["OPENBLAS_CORETYPE"] + " (from the environment)"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return ""
    core = "SkylakeX" if "avx512f" in flags else ("Haswell" if "avx2" in flags else "")
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    return core


OPENBLAS_CORE = _openblas_core()
import torch  # noqa: E402

from mlp import MLP  # noqa: E402
from unet import UNet  # noqa: E402
from dit import DiT, Attention  # noqa: E402


def make_mlp():
    return MLP(2, 256, 4, 64, 0)


def make_unet():
    return UNet(1, [32, 64, 128], 2, 40, 40, 10, False, 4, 8)


def make_dit(patch=4):
    return DiT(size=32, p=patch, c=1, hidden=128, depth=6, heads=4, mlp_ratio=4.0, num_classes=10,
               freq_dim=256, learned_pos=False)


def make(kind):
    if kind == "mlp":
        return make_mlp()
    if kind == "unet":
        return make_unet()
    if kind.startswith("dit"):  # "dit4", "dit2": the patch size
        return make_dit(int(kind[3:]))
    raise ValueError(kind)


def data(kind, batch):
    g = torch.Generator().manual_seed(11)
    shape = (batch, 2) if kind == "mlp" else (batch, 1, 32, 32)
    x = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g)
    t = torch.rand(batch, generator=g)
    y = (torch.arange(batch) % 10).int() if kind != "mlp" else None
    return x, t, y, target


class Trainer:
    def __init__(self, kind, batch):
        torch.manual_seed(0)
        self.model = make(kind)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-2)
        self.x, self.t, self.y, self.target = data(kind, batch)

    def step(self):
        out = self.model(self.x, self.t, self.y)
        loss = torch.mean((out - self.target) ** 2)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()


def timed(fn, min_time, min_iters=3):
    """(wall seconds, process CPU seconds of all threads) per call."""
    fn()  # warm-up (allocator, first-touch)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if n >= min_iters and el >= min_time:
            return el / n, (time.process_time() - c0) / n


ATTENTION_SHAPES = ((64, 64, 128, 4), (64, 256, 128, 4))  # N, L, D, heads (the DiT's blocks)


def attention_figures(f, min_time):
    for n, L, d, h in ATTENTION_SHAPES:
        torch.manual_seed(0)
        attn = Attention(d, h)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(n, L, d, generator=g, requires_grad=True)
        dy = torch.randn(n, L, d, generator=g)
        key = f"{n}/{L}/{d}/{h}"
        with torch.no_grad():
            f[f"attention_forward/{key}"] = timed(lambda: attn(x), min_time)
        y = attn(x)
        f[f"attention_backward/{key}"] = timed(lambda: y.backward(dy, retain_graph=True),
                                               min_time)


def torch_figures(min_time, groups):
    f = {}
    if "mlp" in groups:
        for batch in (1024,):
            tr = Trainer("mlp", batch)
            f[f"mlp_train/{batch}"] = timed(tr.step, min_time)
    if "unet" in groups:
        for batch in (64, 250):
            tr = Trainer("unet", batch)
            f[f"unet_train/{batch}"] = timed(tr.step, min_time)
    if "dit" in groups:
        for patch in (4, 2):
            tr = Trainer(f"dit{patch}", 64)
            f[f"dit_train/p{patch}/64"] = timed(tr.step, min_time)
    with torch.no_grad():
        for kind, batches in (("mlp", (1, 2, 4, 16)), ("unet", (1, 4, 16)),
                              ("dit4", (1, 4, 16, 64))):
            if kind.rstrip("0123456789") not in groups:
                continue
            model = make(kind)
            for batch in batches:
                x, t, y, _ = data(kind, batch)
                name = "dit_forward/p4" if kind == "dit4" else f"{kind}_forward"
                f[f"{name}/{batch}"] = timed(lambda: model(x, t, y), min_time)
    if "dit" in groups:
        attention_figures(f, min_time)
    return f


CPP_NAMES = {
    "BM_dit_train/p:4/N:64": "dit_train/p4/64",
    "BM_dit_train/p:2/N:64": "dit_train/p2/64",
    "BM_dit_forward/p:4/N:1": "dit_forward/p4/1",
    "BM_dit_forward/p:4/N:4": "dit_forward/p4/4",
    "BM_dit_forward/p:4/N:16": "dit_forward/p4/16",
    "BM_dit_forward/p:4/N:64": "dit_forward/p4/64",
    "BM_attention_forward/N:64/L:64/D:128/h:4": "attention_forward/64/64/128/4",
    "BM_attention_forward/N:64/L:256/D:128/h:4": "attention_forward/64/256/128/4",
    "BM_attention_backward/N:64/L:64/D:128/h:4": "attention_backward/64/64/128/4",
    "BM_attention_backward/N:64/L:256/D:128/h:4": "attention_backward/64/256/128/4",
    "BM_mlp_train/1024": "mlp_train/1024",
    "BM_unet_train/64": "unet_train/64",
    "BM_unet_train/250": "unet_train/250",
    "BM_mlp_forward/1": "mlp_forward/1",
    "BM_mlp_forward/2": "mlp_forward/2",
    "BM_mlp_forward_omp/2": "mlp_forward_omp/2",
    "BM_mlp_forward/4": "mlp_forward/4",
    "BM_mlp_forward/16": "mlp_forward/16",
    "BM_mlp_forward_omp/1": "mlp_forward_omp/1",
    "BM_mlp_forward_omp/4": "mlp_forward_omp/4",
    "BM_mlp_forward_omp/16": "mlp_forward_omp/16",
    "BM_unet_forward/1": "unet_forward/1",
    "BM_unet_forward/4": "unet_forward/4",
    "BM_unet_forward/16": "unet_forward/16",
}
UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def cpp_figures(bench, min_time, threads, groups):
    env = flowdiff_env(threads)
    pattern = "|".join(g + "_" if g != "dit" else "dit_|attention_" for g in groups)
    out = subprocess.run(
        [bench, f"--benchmark_filter=BM_({pattern})", "--benchmark_format=json",
         f"--benchmark_min_time={min_time}"],
        env=env, check=True, capture_output=True, text=True).stdout
    f = {}
    for b in json.loads(out)["benchmarks"]:
        name = b["name"].replace("/real_time", "").replace("/process_time", "")
        if name in CPP_NAMES:
            u = UNIT[b["time_unit"]]
            f[CPP_NAMES[name]] = (b["real_time"] * u, b["cpu_time"] * u)
    return f


def max_rss_kib(cmd, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, env=env, check=True, capture_output=True,
                       text=True)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return int(m.group(1))


def load():
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default="build/release/benchmarks/bench_nn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--wait-policy", choices=["best", "passive", "default"], default="best",
                    help="OpenMP waiting: best (PyTorch OMP_WAIT_POLICY=PASSIVE, flowdiff unset: "
                    "each at its faster setting), passive or default (both sides the same)")
    ap.add_argument("--models", default="mlp,unet,dit",
                    help="comma-separated subset of mlp, unet, dit (dit includes attention)")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--train-driver", nargs=3, metavar=("KIND", "BATCH", "STEPS"),
                    help="internal: run STEPS PyTorch training steps and exit")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.train_driver:
        kind, batch, steps = a.train_driver[0], int(a.train_driver[1]), int(a.train_driver[2])
        tr = Trainer(kind, batch)
        for _ in range(steps):
            tr.step()
        return

    groups = [g for g in a.models.split(",") if g]
    print(f"torch {torch.__version__}, OpenBLAS core {OPENBLAS_CORE or 'auto'}, "
          f"{a.threads} threads, wait policy {WAIT_POLICY} (PyTorch {TORCH_POLICY}, "
          f"flowdiff {FLOWDIFF_POLICY}), "
          f"bench {a.bench}; load before: {load()}")
    runs_t, runs_c = [], []
    for r in range(a.rounds):
        runs_t.append(torch_figures(a.min_time, groups))
        runs_c.append(cpp_figures(a.bench, a.min_time, a.threads, groups))
        print(f"round {r + 1}/{a.rounds} done, load {load()}", flush=True)
    def med(runs, k, i):
        return statistics.median(run[k][i] for run in runs)

    print()
    print("Seconds per training step / per forward call, median over rounds; 'wall' is elapsed time,")
    print("'cpu' the process CPU time of all threads. Ratios > 1 favour flowdiff (PyTorch / flowdiff).")
    print()
    print("| figure | PyTorch wall | flowdiff wall | wall ratio | PyTorch cpu | flowdiff cpu | cpu ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    # flowdiff's rows: its figure of the same name, and for the MLP forwards also the one with
    # OpenMP's parallel region instead of the cache's own ThreadTeam (BM_mlp_forward_omp, the
    # cache's own_team = false) against the same PyTorch figure.
    rows = []
    for k in runs_t[0]:
        rows.append((k, k))
        if k.startswith("mlp_forward/"):
            rows.append((k + ", OpenMP region", k.replace("mlp_forward/", "mlp_forward_omp/")))
    for label, ck in rows:
        k = label.split(",")[0]
        if ck not in runs_c[0]:
            continue
        tw, tc = med(runs_t, k, 0), med(runs_t, k, 1)
        cw, cc = med(runs_c, ck, 0), med(runs_c, ck, 1)
        unit, sc = ("us", 1e6) if k.startswith("mlp_forward") else ("ms", 1e3)
        print(f"| {label} | {tw * sc:.1f} {unit} | {cw * sc:.1f} {unit} | {tw / cw:.2f} "
              f"| {tc * sc:.1f} {unit} | {cc * sc:.1f} {unit} | {tc / cc:.2f} |")
    print(f"\nload after: {load()}")

    if a.memory:
        n = str(a.memory_steps)
        cases = []
        if "unet" in groups:
            cases.append(("unet", "unet", "250", "U-Net"))
        if "dit" in groups:
            cases += [("dit", "dit4", "64", "DiT (patch 4)"), ("dit", "dit4", "256", "DiT (patch 4)")]
        for cpp_kind, py_kind, batch, label in cases:
            cpp = max_rss_kib([a.bench, f"--train={cpp_kind}", f"--batch={batch}", f"--steps={n}"],
                              a.threads)
            py = max_rss_kib([sys.executable, os.path.abspath(__file__), "--threads",
                              str(a.threads), "--train-driver", py_kind, batch, n], a.threads)
            print(f"\n{label} training, batch {batch}, {n} steps, maximum resident set size "
                  f"(/usr/bin/time -v): flowdiff {cpp / 1024:.0f} MiB, PyTorch {py / 1024:.0f} "
                  f"MiB, flowdiff / PyTorch = {cpp / py:.2f}")


if __name__ == "__main__":
    main()
