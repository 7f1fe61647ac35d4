"""PyTorch's equivalents of switchyard's fused operations, each timed alone
(forward + backward, or one optimizer step) at a given shape, for the
per-operation table of bench/compare_gpu.py.

    python bench/pytorch_ops.py --batch 8 --seq 1024 --d-model 768 --heads 12 \
        --kv-heads 4 --vocab 4096 --experts 8 --top-k 2 --d-expert 1536 --layers 12

Prints one JSON line: for each operation the median milliseconds of one call
and the calls per training step (per layer, or once), so that
`ms × calls` is comparable with switchyard's per-phase times, which cover
every layer. Not part of the test suite; needs torch (2.5 or later for
grouped-query `scaled_dot_product_attention`).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, device, warmup, steps):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("batch", 8), ("seq", 1024), ("d-model", 768), ("heads", 12),
                          ("kv-heads", 4), ("vocab", 4096), ("experts", 8), ("top-k", 2),
                          ("d-expert", 1536), ("layers", 12), ("warmup", 3), ("steps", 10)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    b, s, d, h, kv = args.batch, args.seq, args.d_model, args.heads, args.kv_heads
    hd, n = d // h, args.batch * args.seq

    def leaf(*shape, std=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * std).requires_grad_()

    def fresh(*tensors):
        # Each call makes new gradients, as a training step after
        # zero_grad(set_to_none=True) does, instead of adding to the last.
        for t in tensors:
            t.grad = None

    q, k, v = leaf(b, h, s, hd), leaf(b, kv, s, hd), leaf(b, kv, s, hd)
    g_attn = torch.randn(b, h, s, hd, device=device, dtype=dtype)

    def attention():
        fresh(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(g_attn)

    x, w = leaf(n, d), leaf(d, args.vocab, std=0.02)
    targets = torch.randint(0, args.vocab, (n,), device=device)

    def head():
        fresh(x, w)
        F.cross_entropy((x @ w).float(), targets).backward()

    xn, gamma = leaf(n, d), leaf(d)
    g_norm = torch.randn(n, d, device=device, dtype=dtype)

    def rms_norm():
        fresh(xn, gamma)
        F.rms_norm(xn, (d,), gamma, eps=1e-5).backward(g_norm)

    # The experts: each expert's SwiGLU over an equal share of the k·n
    # assignments, one loop over experts (PyTorch eager's MoE).
    e, f = args.experts, args.d_expert
    per = n * args.top_k // e
    xe = [leaf(per, d) for _ in range(e)]
    gate, up, down = leaf(e, d, f, std=0.02), leaf(e, d, f, std=0.02), leaf(e, f, d, std=0.02)
    g_exp = torch.randn(per, d, device=device, dtype=dtype)

    def experts():
        fresh(*xe, gate, up, down)
        for i in range(e):
            y = (F.silu(xe[i] @ gate[i]) * (xe[i] @ up[i])) @ down[i]
            y.backward(g_exp)

    # AdamW (fused) over as many f32 parameters as the model holds.
    chunk = 1 << 24
    sizes = [chunk] * (total_params(args) // chunk) + [total_params(args) % chunk]
    params = [torch.randn(n, device=device, requires_grad=True) for n in sizes if n]
    for p in params:
        p.grad = torch.randn_like(p)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=fused)

    def adamw():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    ops = {
        "attention": (attention, args.layers),
        "LM head + loss": (head, 1),
        "RMSNorm": (rms_norm, 2 * args.layers + 1),
        "expert matmuls (per-expert loop)": (experts, args.layers),
        "optimizer (fused AdamW + clip)": (adamw, 1),
    }
    out = {name: {"ms": timed(fn, device, args.warmup, args.steps), "calls": calls}
           for name, (fn, calls) in ops.items()}
    print(json.dumps(out))


def total_params(args):
    """The model's parameter count, near enough for the optimizer's memory
    traffic: embeddings, attention, routers, experts and norms."""
    d, hd = args.d_model, args.d_model // args.heads
    attn = d * hd * (2 * args.heads + 2 * args.kv_heads)
    moe = args.experts * 3 * d * args.d_expert + d * args.experts
    return 2 * args.vocab * d + args.layers * (attn + moe + 2 * d) + d


if __name__ == "__main__":
    main()
