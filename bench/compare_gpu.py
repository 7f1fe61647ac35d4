"""switchyard against PyTorch eager on one GPU, in f32 and in bf16, at the
GPU bench shape, and the README table with tokens/s, MFU and device memory.

    scripts/build-cuda-offline.sh      # or: cargo build --release --features cuda
    python3 bench/compare_gpu.py --python /path/to/python-with-torch

Runs, in order: switchyard f32, switchyard bf16 (router, norms and loss in
f32), PyTorch f32, PyTorch bf16 autocast. PyTorch is built at the shape
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
import os
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
    ap.add_argument("--no-f32", action="store_true", help="skip the two f32 runs")
    args = ap.parse_args()

    base = ["--config", args.config, "--device", args.device, "--warmup", str(args.warmup),
            "--no-sgemm"]
    for kv in args.set:
        base += ["--set", kv]
    bf16 = base + ["--set", "train.precision=bf16"] + (["--profile"] if args.profile else [])
    torch_common = ["--device", args.torch_device, "--warmup", str(args.warmup)]

    rows = {}
    if not args.no_f32:
        rows["switchyard, f32"] = switchyard(args, base)
    rows["switchyard, bf16"] = switchyard(args, bf16)
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
    if sy.get("phases"):
        print("\nswitchyard bf16 phases (each alone, forward + backward, all layers):")
        for p in sy["phases"]:
            print(f"  {p['name']:<44} {p['seconds'] * 1e3:9.2f} ms "
                  f"{100 * p['seconds'] / sy['median_step_s']:5.1f}%")


if __name__ == "__main__":
    main()
