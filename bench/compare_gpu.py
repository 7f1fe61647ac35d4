"""switchyard against PyTorch eager on one GPU, in f32 and in bf16, at the
GPU bench shape, and the README table with tokens/s, MFU and device memory.

    scripts/build-cuda-offline.sh      # or: cargo build --release --features cuda
    python3 bench/compare_gpu.py --python /path/to/python-with-torch

Runs, in order: switchyard f32 with its GPU kernels, switchyard f32 on
Burn's composed path (`train.gpu_kernels=false`), switchyard bf16 (router,
norms, softmax statistics and loss in f32) with its kernels (and, with
--bf16-composed, on the composed path), PyTorch f32, PyTorch bf16
autocast; with --dense also the dense twin (one MLP as wide as the two
active experts) in f32 and bf16, for the MoE step's cost over dense. The two f32 switchyard runs are profiled, and
bench/pytorch_ops.py times PyTorch's equivalent of each fused operation at
the same shape, for a second table: each operation with switchyard's kernel,
on the composed path, and in PyTorch. PyTorch is built at the shape
switchyard's f32 report resolved from the config, so the two cannot drift
apart. MFU is model FLOPs per second (6 per active weight per token plus
attention, the same count for every row) over --peak-tflops, by default the
H100 SXM's 989 dense bf16 TFLOP/s; f32 rows are read against the same peak.
Device memory is what the allocator reserved: switchyard's most after a
step, PyTorch's max_memory_reserved.

--device and --torch-device change the devices, and --set passes overrides
to switchyard, so the script also runs on a machine without a GPU
(`--device flex --torch-device cpu`, a small config) to check it.
"""

import argparse
import json
import os
import subprocess
import sys

from compare import ROOT, pytorch, switchyard


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/switchyard"),
                    help="a switchyard binary built with --features cuda")
    ap.add_argument("--config", default="configs/bench-moe-gpu.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="switchyard config override (repeatable)")
    ap.add_argument("--device", default="cuda", help="switchyard's --device")
    ap.add_argument("--torch-device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of PyTorch")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the device's dense bf16 peak, for MFU (H100 SXM: 989)")
    ap.add_argument("--profile", action="store_true",
                    help="also print switchyard's per-phase breakdown (bf16 run)")
    ap.add_argument("--no-f32", action="store_true",
                    help="skip the f32 runs (and the per-operation table)")
    ap.add_argument("--bf16-composed", action="store_true",
                    help="also time bf16 on the composed path (train.gpu_kernels=false)")
    ap.add_argument("--dense", action="store_true",
                    help="also time the dense twin (in bf16, and in f32 unless --no-f32)")
    args = ap.parse_args()

    base = ["--config", args.config, "--device", args.device, "--warmup", str(args.warmup),
            "--no-sgemm"]
    for kv in args.set:
        base += ["--set", kv]
    bf16 = base + ["--set", "train.precision=bf16"] + (["--profile"] if args.profile else [])
    torch_common = ["--device", args.torch_device, "--warmup", str(args.warmup)]

    rows = {}
    if not args.no_f32:
        rows["switchyard, f32"] = switchyard(args, base + ["--profile"])
        rows["switchyard, f32, composed path"] = switchyard(
            args, base + ["--profile", "--set", "train.gpu_kernels=false"])
    if args.dense and not args.no_f32:
        # As wide as the active experts together.
        moe = rows["switchyard, f32"]["moe"]
        d_ff = moe["top_k"] * moe["d_expert"]
        rows["switchyard dense twin, f32"] = switchyard(
            args, base + ["--set", "moe.num_experts=0", "--set", f"model.d_ff={d_ff}"])
    rows["switchyard, bf16"] = switchyard(args, bf16)
    if args.bf16_composed:
        rows["switchyard, bf16, composed path"] = switchyard(
            args, bf16 + ["--set", "train.gpu_kernels=false"])
    if args.dense:
        moe = rows["switchyard, bf16"]["moe"]
        d_ff = moe["top_k"] * moe["d_expert"]
        rows["switchyard dense twin, bf16"] = switchyard(
            args, bf16 + ["--set", "moe.num_experts=0", "--set", f"model.d_ff={d_ff}"])
    shape = rows.get("switchyard, f32") or rows["switchyard, bf16"]
    if not args.no_f32:
        rows["PyTorch eager, f32"] = pytorch(args, shape, torch_common + ["--dtype", "f32"])
    rows["PyTorch eager, bf16 autocast"] = pytorch(args, shape, torch_common + ["--dtype", "bf16"])

    flops = shape["flops_per_step"]
    for name, res in rows.items():
        if abs(res["flops_per_step"] / flops - 1) > 0.01:
            print(f"note: {name} counts {res['flops_per_step'] / 1e12:.3f} TFLOP/step, "
                  f"switchyard {flops / 1e12:.3f}; the table uses switchyard's", file=sys.stderr)
    m = shape["model"]
    print(f"shape: {args.config}, d_model {m['d_model']}, {m['n_layers']} layers, seq {m['seq_len']}, "
          f"batch {shape['batch_size']}, {shape['moe']['num_experts']} experts top-{shape['moe']['top_k']}; "
          f"{shape['params'] / 1e6:.0f}M parameters, {shape['active_params'] / 1e6:.0f}M active, "
          f"{flops / 1e12:.2f} TFLOP/step\n")
    print(f"| run | tokens/s | s/step | model TFLOP/s | MFU (of {args.peak_tflops:g}) | device memory MiB |")
    print("|---|---|---|---|---|---|")
    for name, res in rows.items():
        tflops = flops / res["median_step_s"] / 1e12
        mem = res.get("device_reserved_mb") or res.get("peak_gpu_reserved_mb")
        mem = f"{mem:.0f}" if mem else f"({res['peak_rss_mb']:.0f} RSS)"
        print(f"| {name} | {res['tokens_per_s']:.0f} | {res['median_step_s']:.3f} | {tflops:.2f} | "
              f"{100 * tflops / args.peak_tflops:.2f}% | {mem} |")
    sy, pt = rows["switchyard, bf16"], rows["PyTorch eager, bf16 autocast"]
    print(f"\nswitchyard bf16 / PyTorch bf16 tokens/s: {sy['tokens_per_s'] / pt['tokens_per_s']:.2f}")
    if not args.no_f32:
        print(f"switchyard bf16 / f32 tokens/s: "
              f"{sy['tokens_per_s'] / rows['switchyard, f32']['tokens_per_s']:.2f}")
    if args.bf16_composed:
        composed = rows["switchyard, bf16, composed path"]
        print(f"switchyard bf16, kernels / composed path tokens/s: "
              f"{sy['tokens_per_s'] / composed['tokens_per_s']:.2f}")
    for dtype in ["f32", "bf16"]:
        if f"switchyard dense twin, {dtype}" in rows:
            moe, dense = rows[f"switchyard, {dtype}"], rows[f"switchyard dense twin, {dtype}"]
            print(f"MoE step / dense twin step ({dtype}): "
                  f"{moe['median_step_s'] / dense['median_step_s']:.2f}")
    if not args.no_f32:
        per_operation(args, shape, rows["switchyard, f32"], rows["switchyard, f32, composed path"])
    if sy.get("phases"):
        print("\nswitchyard bf16 phases (each alone, forward + backward, all layers):")
        for p in sy["phases"]:
            print(f"  {p['name']:<44} {p['seconds'] * 1e3:9.2f} ms "
                  f"{100 * p['seconds'] / sy['median_step_s']:5.1f}%")


def per_operation(args, shape, kernels, composed):
    """One table: each fused operation's time per step with switchyard's
    kernel, on the composed path, and in PyTorch (bench/pytorch_ops.py)."""
    m, moe = shape["model"], shape["moe"]
    cmd = [args.python, os.path.join(ROOT, "bench/pytorch_ops.py"), "--device", args.torch_device,
           "--batch", shape["batch_size"], "--seq", m["seq_len"], "--d-model", m["d_model"],
           "--heads", m["n_heads"], "--kv-heads", m["n_kv_heads"], "--vocab", m["vocab_size"],
           "--experts", max(moe["num_experts"], 1), "--top-k", moe["top_k"],
           "--d-expert", moe["d_expert"], "--layers", m["n_layers"]]
    out = subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    torch_ops = json.loads(out.strip().splitlines()[-1])
    pairs = {"attention": "attention", "LM head + loss": "LM head + loss",
             "expert matmuls": "expert matmuls (per-expert loop)",
             "optimizer": "optimizer (fused AdamW + clip)"}
    ms = lambda report, name: next(  # noqa: E731
        (1e3 * p["seconds"] for p in report["phases"] if p["name"] == name), float("nan"))
    print("\nper operation, f32, ms per training step (all layers), forward + backward:\n")
    print("| operation | switchyard kernel | composed path | PyTorch | kernel / composed | kernel / PyTorch |")
    print("|---|---|---|---|---|---|")
    for ours, theirs in pairs.items():
        k, c = ms(kernels, ours), ms(composed, ours)
        t = torch_ops[theirs]["ms"] * torch_ops[theirs]["calls"]
        print(f"| {ours} | {k:.2f} | {c:.2f} | {t:.2f} | {k / c:.2f} | {k / t:.2f} |")
    norm = torch_ops["RMSNorm"]
    print(f"\nPyTorch RMSNorm: {norm['ms'] * norm['calls']:.2f} ms per step ({norm['calls']} calls); "
          "switchyard's norms are inside 'other' of the phase breakdown.")


if __name__ == "__main__":
    main()
