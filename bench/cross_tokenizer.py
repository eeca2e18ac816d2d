"""The cross-tokenizer objective (``loss.cross_tokenizer``) against the same-vocabulary fused objective
and against a plain logits implementation of itself: forward + backward time and peak memory.

    python bench/cross_tokenizer.py --vocab 32000 --teacher-vocab 48000 --tokens 512 --visual 64

Variants (each in a fresh subprocess): ``fused`` — :func:`mllm_kd.losses.fused.fused_distill_loss` with a
teacher of the student's vocabulary (what the stage runs without the option); ``cross`` —
:func:`mllm_kd.losses.cross_tokenizer.cross_tokenizer_loss` with a teacher of ``--teacher-vocab`` tokens,
half of the student's shared, every response position aligned, ``--teacher-visual`` visual tokens pooled
to ``--visual``; ``cached`` — the same objective against a cached teacher
(:func:`mllm_kd.losses.cached_cross.cached_cross_tokenizer_loss`, the teacher's top ``--k`` at the same rows,
built before the timed passes as the cache would hold them; tau = 1 for every variant); ``logits`` — the
same terms from the full ``[B, T, V]`` logits of both models with autograd. Peak memory: the resident-set high-water mark (``VmHWM``) over the pass minus the resident set
before it (Linux; see bench/kd_loss.py). The last line printed is a JSON object of all variants.

``--truncation``: instead of timing, the error of the cached divergence
(:func:`~mllm_kd.losses.cached_cross.topk_cross_divergence`, top ``--topks``) against the full
:func:`~mllm_kd.losses.cross_tokenizer.cross_vocab_divergence`, float64, on 64 rows of a teacher
``softmax(s * N(0, 1))`` for the sharpness ``s`` in ``--scales``, and a student equal to it plus N(0, 1) noise
on the shared tokens: the teacher's mass outside the top k, the relative error of the mean divergence and
the cosine between the two gradients wrt the student's logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kd_loss import _reset_peak_rss, _rss_kib, _trim_heap

VARIANTS = ("fused", "cross", "cached", "logits")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--teacher-vocab", type=int, default=48000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=512, help="tokens per sample (visual + response)")
    p.add_argument("--visual", type=int, default=64, help="student visual tokens per sample")
    p.add_argument("--teacher-visual", type=int, default=256, help="teacher visual tokens per sample")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--k", type=int, default=32, help="cached: teacher log-probabilities kept per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--truncation", action="store_true", help="measure the top-k error instead of time")
    p.add_argument("--topks", default="8,32,128", help="--truncation: k values")
    p.add_argument("--scales", default="2,4,6", help="--truncation: teacher sharpness values")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from mllm_kd.losses.cached_cross import cached_cross_tokenizer_loss
    from mllm_kd.losses.cross_tokenizer import cross_tokenizer_loss, cross_vocab_divergence, pool_visual
    from mllm_kd.losses.fused import fused_distill_loss
    from mllm_kd.losses.reference import DistillSettings, relation_distill

    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    B, T, V, d, n = args.batch, args.tokens, args.vocab, args.hidden, args.visual
    Vt, nt = (V, n) if args.worker == "fused" else (args.teacher_vocab, args.teacher_visual)
    Tt = T - n + nt
    hs = torch.randn(B, T, d, generator=g).requires_grad_()
    ws = (torch.randn(V, d, generator=g) * d**-0.5).requires_grad_()
    ht, wt = torch.randn(B, Tt, d, generator=g), torch.randn(Vt, d, generator=g) * d**-0.5
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1 : 1 + n] = True
    tvis = torch.zeros(B, Tt, dtype=torch.bool)
    tvis[:, 1 : 1 + nt] = True
    labels = torch.full((B, T), -100, dtype=torch.long)
    labels[:, 1 + n :] = torch.randint(0, V, (B, T - 1 - n), generator=g)
    resp_pos = torch.arange(n, T - 1).expand(B, -1)  # every response position aligned
    align_t = resp_pos - n + nt
    shared = (torch.arange(0, V, 2), torch.arange(0, V, 2) % Vt)
    settings = DistillSettings()
    weights = {"ce": 1.0, "mdist_resp": 1.0, "mdist_vis": 1.0, "rdist": 1.0}

    def step():
        if args.worker == "fused":
            total, _ = fused_distill_loss(
                hs, ws, labels, weights, ht, wt, vis, n, settings, chunk_size=args.chunk_size
            )
        elif args.worker == "cached":
            total, _ = cached_cross_tokenizer_loss(
                hs, ws, labels, weights, cached, settings, vis, n, chunk_size=args.chunk_size
            )
        elif args.worker == "cross":
            total, _ = cross_tokenizer_loss(
                hs, ws, labels, weights, ht, wt, resp_pos, align_t, shared, settings, vis, tvis, n, nt,
                chunk_size=args.chunk_size,
            )  # fmt: skip
        else:
            zs, zt = hs @ ws.t(), ht @ wt.t()

            def div(a, b):
                log_a, log_b = F.log_softmax(a, -1), F.log_softmax(b, -1)
                return cross_vocab_divergence(log_a, log_b, *shared).mean()

            rs = torch.cat([zs[b, resp_pos[b]] for b in range(B)])
            rt = torch.cat([zt[b, align_t[b]] for b in range(B)])
            vs = pool_visual(hs[vis].view(B, n, d), n) @ ws.t()
            vt = pool_visual(ht[tvis].view(B, nt, d), n) @ wt.t()
            ce = F.cross_entropy(zs[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
            total = ce + div(rs, rt) + div(vs.reshape(-1, V), vt.reshape(-1, Vt)) + relation_distill(vs, vt)
        total.backward()
        hs.grad = ws.grad = None

    if args.worker == "cached":
        cached = _cache_rows(args, ht, wt, tvis, resp_pos, align_t, shared, n, nt, Vt, V)
    step()  # warm-up
    times, peaks = [], []
    for _ in range(args.repeats):
        _trim_heap()
        base = _rss_kib("VmRSS")
        _reset_peak_rss()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append((_rss_kib("VmHWM") - base) * 1024)
    return {
        "variant": args.worker,
        "seconds": statistics.median(times),
        "peak_bytes": statistics.median(peaks),
    }


def _cache_rows(args, ht, wt, tvis, resp_pos, align_t, shared, n, nt, Vt, V):
    """The :class:`~mllm_kd.losses.cached_cross.CrossCachedBatch` a cross-tokenizer cache holds for the
    batch (what :mod:`mllm_kd.teacher.cache_cross` stores, float16 log-probabilities included)."""
    import torch

    from mllm_kd.losses.cached import CachedBatch
    from mllm_kd.losses.cached_cross import CrossCachedBatch
    from mllm_kd.losses.cross_tokenizer import pool_visual
    from mllm_kd.teacher.cache_format import teacher_topk

    B, d = ht.shape[0], ht.shape[-1]
    pooled = pool_visual(ht[tvis].view(B, nt, d), n)
    rows, positions, sample = [], [], []
    for b in range(B):
        rows += [ht[b, align_t[b]], pooled[b]]
        positions += [resp_pos[b], torch.full((n,), -1)]
        sample.append(torch.full((resp_pos.shape[1] + n,), b))
    shared_t = torch.zeros(Vt, dtype=torch.bool)
    shared_t[shared[1]] = True
    to_student = torch.full((Vt,), V)
    to_student[shared[1]] = shared[0]
    top, idx, rest, rest_shared = teacher_topk(torch.cat(rows), wt, None, args.k, args.chunk_size, shared_t)
    zv = pooled @ wt.t()
    in_shared = torch.zeros(V, dtype=torch.bool)
    in_shared[shared[0]] = True
    return CrossCachedBatch(
        CachedBatch(top.float(), to_student[idx], rest, zv @ zv.transpose(1, 2)),
        rest_shared, torch.cat(positions), torch.cat(sample), in_shared, n,
    )  # fmt: skip


def truncation(args) -> list[dict]:
    """The cached divergence's error against the full one (module docstring, ``--truncation``)."""
    import torch
    import torch.nn.functional as F

    from mllm_kd.losses.cached_cross import topk_cross_divergence
    from mllm_kd.losses.cross_tokenizer import cross_vocab_divergence

    g = torch.Generator().manual_seed(0)
    N, V, Vt = 64, args.vocab, args.teacher_vocab
    S = min(V, Vt) // 2
    shared = (torch.randperm(V, generator=g)[:S], torch.randperm(Vt, generator=g)[:S])
    to_student = torch.full((Vt,), V)
    to_student[shared[1]] = shared[0]
    in_shared, shared_t = torch.zeros(V, dtype=torch.bool), torch.zeros(Vt, dtype=torch.bool)
    in_shared[shared[0]], shared_t[shared[1]] = True, True
    out = []
    for scale in (float(x) for x in args.scales.split(",")):
        zt = torch.randn(N, Vt, generator=g, dtype=torch.float64) * scale
        zs = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
        zs[:, shared[0]] = zt[:, shared[1]] + torch.randn(N, S, generator=g, dtype=torch.float64)
        zs.requires_grad_()
        lt = F.log_softmax(zt, -1)
        for kind in ("fkl", "rkl", "jsd"):
            full = cross_vocab_divergence(F.log_softmax(zs, -1), lt, *shared, kind).mean()
            (g_full,) = torch.autograd.grad(full, zs)
            for k in (int(x) for x in args.topks.split(",")):
                top, idx = lt.topk(k, -1)
                others = lt.scatter(1, idx, float("-inf"))
                rest_shared = others.masked_fill(~shared_t, float("-inf")).logsumexp(-1)
                rest = others.logsumexp(-1)
                cut = topk_cross_divergence(
                    F.log_softmax(zs, -1), top, to_student[idx], rest, rest_shared, in_shared, kind
                ).mean()
                (g_cut,) = torch.autograd.grad(cut, zs)
                row = {
                    "scale": scale,
                    "kind": kind,
                    "k": k,
                    "leftover": float(rest.exp().mean()),
                    "relative_error": float((full - cut).detach() / full.detach()),
                    "grad_cosine": float(F.cosine_similarity(g_full.flatten(), g_cut.flatten(), dim=0)),
                }
                print(
                    " ".join(
                        f"{key} {val:.4g}" if isinstance(val, float) else f"{key} {val}"
                        for key, val in row.items()
                    )
                )
                out.append(row)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.truncation:
        print(json.dumps(truncation(args)))
        return 0
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            results[variant] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
            continue
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:7s} {r['seconds']:.3f} s  peak {r['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
