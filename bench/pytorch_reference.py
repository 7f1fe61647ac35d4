"""PyTorch reference for `switchyard bench`: the same shapes as
configs/bench-moe.toml and configs/bench-dense.toml, trained with
transformers' MixtralForCausalLM (MoE) or MistralForCausalLM (dense twin),
AdamW and global-norm clipping, on synthetic token ids.

Not part of the test suite; needs `pip install torch transformers`.

    python bench/pytorch_reference.py --model moe --threads 2
    python bench/pytorch_reference.py --model dense --threads 2

The defaults are the CPU bench shape. bench/compare.py and
bench/compare_gpu.py pass the shape of the switchyard config they run.

Prints one JSON line: tokens/s, median step seconds, peak RSS (and peak GPU
memory on CUDA, allocated and reserved), and the model FLOPs per step.
"""

import argparse
import json
import resource
import statistics
import time

import torch


def build(args):
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    if args.model == "moe":
        cfg = MixtralConfig(
            intermediate_size=args.d_expert,
            num_local_experts=args.experts,
            num_experts_per_tok=args.top_k,
            router_aux_loss_coef=args.aux_coef,
            output_router_logits=True,
            router_jitter_noise=0.0,
            **common,
        )
        cfg._attn_implementation = args.attn
        return MixtralForCausalLM(cfg)
    cfg = MistralConfig(intermediate_size=args.d_ff, **common)
    cfg._attn_implementation = args.attn
    return MistralForCausalLM(cfg)


def active_params(model, args):
    """Parameters a token passes through (top-k of E experts), embeddings excluded."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        n = p.numel()
        if ".experts." in name or "experts" in name.split(".")[-2:]:
            n = n * args.top_k // args.experts
        total += n
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["moe", "dense"], default="moe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="eager or sdpa")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-expert", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-coef", type=float, default=0.001)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build(args).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(dev)
        # bf16 runs under autocast: master weights and AdamW stay in f32.
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(input_ids=ids[:, :-1])
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            if args.model == "moe":
                loss = loss + args.aux_coef * out.aux_loss
                z = sum(torch.logsumexp(r.float(), dim=-1).square().mean() for r in out.router_logits)
                loss = loss + args.z_coef * z
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # host sync, as switchyard reads its loss every step
        return value

    times = []
    for i in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    tokens = args.batch * args.seq
    n_active = active_params(model, args)
    head = args.d_model * args.vocab
    # 6 FLOPs per active weight per token (forward + backward), plus attention
    # scores and values: 6 · 2 · layers · seq · d_model per token (causal not halved).
    flops = 6 * n_active * tokens + 12 * args.layers * args.seq * args.d_model * tokens
    result = {
        "impl": "pytorch",
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "tokens_per_step": tokens,
        "median_step_s": med,
        "tokens_per_s": tokens / med,
        "steps_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "active_params": n_active,
        "lm_head_params": head,
        "flops_per_step": flops,
        "achieved_tflops": flops / med / 1e12,
    }
    if dev.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
