"""Benchmark: fused, chunked distillation losses vs the logits reference, on the same tensors.

Forward + backward of MDist_resp + MDist_vis + RDist (optionally + CE) for a batch of ``--batch`` samples
of ``--tokens`` tokens, ``--visual`` of them visual per sample (one image, right after the first token)
and every later token a supervised response token. The student's hidden states and head weight get
gradients; the teacher's are constants, as in training.

    python bench/kd_loss.py                                                 # full size (a GPU)
    python bench/kd_loss.py --device cpu --vocab 32000 --tokens 512 --visual 364   # small, on a CPU

Each variant runs in a fresh subprocess that builds the inputs from the same seed (so both see the same
tensors), runs one untimed warm-up and then ``--repeats`` timed forward + backward passes.

Peak memory is what the loss adds on top of its inputs:
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated once the inputs exist
  (peak stats reset before each pass).
* CPU: the process's resident-set high-water mark minus its resident set just before the pass (inputs
  allocated, previous gradients dropped, freed heap memory returned with glibc's ``malloc_trim``). The
  high-water mark is reset before each pass by writing ``5`` to ``/proc/self/clear_refs`` and read from
  ``VmHWM`` in ``/proc/self/status``; where that is not possible, ``getrusage(RUSAGE_SELF).ru_maxrss``
  over the whole worker (warm-up included) minus the resident set once the inputs exist is used
  instead, and the table says so. The resident set counts what torch allocates on the CPU, plus a little
  allocator and thread-pool overhead that both variants pay.

The table gives medians over the repeats and the spread (min-max); the LAST line printed is one JSON
object with the settings, both variants' numbers, the agreement of their results and
``peak_memory_ratio`` / ``time_ratio`` (fused / reference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

VARIANTS = ("reference", "fused")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896, help="student hidden size")
    p.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden size (default: --hidden)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sample")
    p.add_argument("--visual", type=int, default=728, help="visual tokens per sample (one image)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk of the fused path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="hidden states and heads"
    )
    p.add_argument("--kind", default="fkl", choices=("fkl", "rkl", "jsd", "skl", "srkl"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--with-ce", action="store_true", help="add the next-token cross-entropy to the objective")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of reference,fused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.teacher_hidden = args.teacher_hidden or args.hidden
    if not 0 < args.visual < args.tokens - 1:
        p.error("--visual must leave room for a first token and at least one response token")
    return args


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# -------------------------------------------------------------------------------------------- worker
def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps some), so the resident set is live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(args, torch):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    B, T, V, n = args.batch, args.tokens, args.vocab, args.visual

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=args.device, dtype=dtype)

    hs = randn(B, T, args.hidden).requires_grad_()
    ws = randn(V, args.hidden, scale=args.hidden**-0.5).requires_grad_()
    ht = randn(B, T, args.teacher_hidden)
    wt = randn(V, args.teacher_hidden, scale=args.teacher_hidden**-0.5)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1 : 1 + n] = True
    labels = torch.full((B, T), -100, dtype=torch.long)
    labels[:, 1 + n :] = torch.randint(0, V, (B, T - 1 - n), generator=g)
    probes = (torch.randn(B, T, args.hidden, generator=g), torch.randn(V, args.hidden, generator=g))
    return hs, ws, ht, wt, vis.to(args.device), labels.to(args.device), probes


def run_worker(args) -> dict:
    import torch

    from mllm_kd.losses import DistillSettings, causal_lm_loss, distill_terms
    from mllm_kd.losses.fused import fused_distill_loss

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hs, ws, ht, wt, vis, labels, probes = make_inputs(args, torch)
    settings = DistillSettings(kind=args.kind, temperature=args.temperature)
    weights = {"ce": 1.0 if args.with_ce else 0.0, "mdist_resp": 1.0, "mdist_vis": 1.0, "rdist": 1.0}

    def step():
        hs.grad = ws.grad = None
        if args.worker == "fused":
            total, terms = fused_distill_loss(
                hs,
                ws,
                labels,
                weights,
                ht,
                wt,
                vis,
                args.visual,
                settings,
                chunk_size=args.chunk_size,
                with_ce=args.with_ce,
            )
        else:
            zs = torch.nn.functional.linear(hs, ws)
            with torch.no_grad():
                zt = torch.nn.functional.linear(ht, wt)
            terms = distill_terms(zs, zt, labels, vis, args.visual, settings)
            if args.with_ce:
                terms["ce"] = causal_lm_loss(zs, labels)
            total = sum(weights[k] * v for k, v in terms.items())
            del zs, zt
        total.backward()
        return total.detach(), {k: float(v) for k, v in terms.items()}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    base_cuda = torch.cuda.memory_allocated() if cuda else 0
    base_rss = _rss_kib("VmRSS")
    step()  # warm-up (allocator, thread pools); its grads are dropped by the next step
    times, peaks = [], []
    per_pass_rss = base_rss is not None and _reset_peak_rss() and _rss_kib("VmHWM") is not None
    for _ in range(args.repeats):
        hs.grad = ws.grad = None
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        elif per_pass_rss:
            _trim_heap()
            base_rss = _rss_kib("VmRSS")
            _reset_peak_rss()
        t0 = time.perf_counter()
        total, terms = step()
        sync()
        times.append(time.perf_counter() - t0)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() - base_cuda)
        elif per_pass_rss:
            peaks.append((_rss_kib("VmHWM") - base_rss) * 1024)
    method = "cuda.max_memory_allocated" if cuda else ("VmHWM (clear_refs)" if per_pass_rss else "ru_maxrss")
    if not cuda and not per_pass_rss:
        base = base_rss if base_rss is not None else 0
        peaks = [(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024]
    checks = {
        "loss": float(total),
        "grad_hidden_probe": float((hs.grad.float().cpu() * probes[0]).sum()),
        "grad_weight_probe": float((ws.grad.float().cpu() * probes[1]).sum()),
        "grad_hidden_norm": float(hs.grad.float().norm()),
        "grad_weight_norm": float(ws.grad.float().norm()),
    }
    return {
        "variant": args.worker,
        "times_s": times,
        "peaks_bytes": peaks,
        "memory_method": method,
        "terms": terms,
        "checks": checks,
    }


# -------------------------------------------------------------------------------------------- parent
def _spawn(args, variant: str) -> dict:
    argv = list(sys.argv[1:])
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
    if "--device" not in argv:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"variant": variant, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = {v: _spawn(args, v) for v in variants}

    n_resp = args.batch * (args.tokens - 1 - args.visual)
    print(
        f"# KD loss benchmark: V={args.vocab}, d_s={args.hidden}, d_t={args.teacher_hidden}, "
        f"batch {args.batch} x {args.tokens} tokens ({args.visual} visual/sample, {n_resp} response positions), "
        f"{args.dtype}, {args.kind}, chunk {args.chunk_size}, device {args.device}"
        f" ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n"
    )
    print(
        "| variant | time median (s) | time spread (s) | peak memory median | peak spread | memory method |"
    )
    print("|---|---|---|---|---|---|")
    summary: dict = {}
    for v, r in results.items():
        if "error" in r:
            print(f"| {v} | failed: {' '.join(r['error'])} | | | | |")
            summary[v] = {"error": r["error"]}
            continue
        t, m = r["times_s"], r["peaks_bytes"]
        summary[v] = {
            "time_median_s": statistics.median(t),
            "time_min_s": min(t),
            "time_max_s": max(t),
            "peak_memory_median_bytes": statistics.median(m),
            "peak_memory_min_bytes": min(m),
            "peak_memory_max_bytes": max(m),
            "memory_method": r["memory_method"],
            "terms": r["terms"],
            "checks": r["checks"],
        }
        print(
            f"| {v} | {statistics.median(t):.3f} | {min(t):.3f}-{max(t):.3f} | {_fmt_bytes(statistics.median(m))} "
            f"| {_fmt_bytes(min(m))}-{_fmt_bytes(max(m))} | {r['memory_method']} |"
        )
    out = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "teacher_hidden": args.teacher_hidden,
        "tokens": args.tokens,
        "visual": args.visual,
        "batch": args.batch,
        "chunk_size": args.chunk_size,
        "dtype": args.dtype,
        "kind": args.kind,
        "with_ce": args.with_ce,
        "device": args.device,
        "repeats": args.repeats,
        "variants": summary,
    }
    ref, fused = summary.get("reference", {}), summary.get("fused", {})
    if "time_median_s" in ref and "time_median_s" in fused:
        out["peak_memory_ratio"] = fused["peak_memory_median_bytes"] / max(ref["peak_memory_median_bytes"], 1)
        out["time_ratio"] = fused["time_median_s"] / ref["time_median_s"]
        out["max_rel_diff"] = max(_rel(fused["checks"][k], ref["checks"][k]) for k in ref["checks"])
        print(
            f"\nfused / reference: peak memory {out['peak_memory_ratio']:.3f}, time {out['time_ratio']:.3f}; "
            f"results agree to {out['max_rel_diff']:.1e} (relative; loss and gradient probes)"
        )
    print(json.dumps(out))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
