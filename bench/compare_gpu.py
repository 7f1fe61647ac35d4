"""switchyard against PyTorch eager on one GPU, in f32 and in bf16, at the
GPU bench shape, and the README table with tokens/s, MFU and device memory.

    scripts/build-cuda-offline.sh      # or: cargo build --release --features cuda
    python3 bench/compare_gpu.py --python /path/to/python-with-torch

Runs, in order: switchyard f32 with its GPU kernels, switchyard f32 on
Burn's composed path (`train.gpu_kernels=false`), switchyard bf16 (router,
norms, softmax statistics and loss in f32) with its kernels (and, with
--bf16-composed, on the composed path), PyTorch f32, PyTorch bf16
autocast; with --dense also the dense twin (one MLP as wide as the two
active experts) in f32 and bf16, for the MoE step's cost over dense; last,
unless --no-fused, switchyard bf16 and f32 with the experts' SwiGLU fused
into its own tiled matmul (`train.gpu_fused_swiglu=true`) instead of
CubeCL's matmuls and a separate pass. The f32 switchyard runs are profiled, and
bench/pytorch_ops.py times PyTorch's equivalent of each fused operation at
the same shape, for a second table: each operation with switchyard's kernel,
on the composed path, and in PyTorch. PyTorch is built at the shape
switchyard's f32 report resolved from the config, so the two cannot drift
apart. MFU is model FLOPs per second (6 per active weight per token plus
attention, the same count for every row) over --peak-tflops, by default the
H100 SXM's 989 dense bf16 TFLOP/s; f32 rows are read against the same peak.
Device memory is what the allocator reserved: switchyard's most after a
step, PyTorch's max_memory_reserved.

Each run is tried on its own, in this order: the headline pair (switchyard
bf16, PyTorch bf16), then f32, then the optional rows. A run that fails
costs its row, not the table; --budget-s stops starting runs after that
many seconds; each finished report goes to --out at once (rows.json,
default $OUT/compare-gpu), and the tables last (tables.md).
scripts/gpu-bench.sh wraps this for a lent GPU.

--device and --torch-device change the devices, and --set passes overrides
to switchyard, so the script also runs on a machine without a GPU
(`--device flex --torch-device cpu`, a small config) to check it.
"""

import argparse
import json
import os
import sys
import time

from compare import ROOT, pytorch, run, switchyard


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
    ap.add_argument("--no-fused", action="store_true",
                    help="skip the runs with the SwiGLU fused into the experts' matmul "
                         "(train.gpu_fused_swiglu=true)")
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "compare-gpu")
                    if os.environ.get("OUT") else None,
                    help="folder for each run's report as soon as it completes (rows.json) "
                         "and the tables (tables.md); default $OUT/compare-gpu when OUT is set")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no run after this many seconds (0: no limit); the tables "
                         "then show what finished")
    args = ap.parse_args()
    started = time.time()
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    base = ["--config", args.config, "--device", args.device, "--warmup", str(args.warmup),
            "--no-sgemm"]
    for kv in args.set:
        base += ["--set", kv]
    bf16 = base + ["--set", "train.precision=bf16"] + (["--profile"] if args.profile else [])
    torch_common = ["--device", args.torch_device, "--warmup", str(args.warmup)]

    # Each run is tried on its own: a failure or the budget costs its row,
    # not the table. Every finished report is saved at once, so a lease
    # that ends early still leaves them under --out.
    rows, missing = {}, {}

    def attempt(name, fn):
        clock = time.time()
        if args.budget_s and clock - started > args.budget_s:
            missing[name] = f"not started: {clock - started:.0f} s is past --budget-s"
            print(f"{name}: {missing[name]}", flush=True)
            return None
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - any failure costs this row only
            missing[name] = f"failed: {e}"
            print(f"{name}: FAILED after {time.time() - clock:.0f} s\n{e}", flush=True)
            return None
        rows[name] = res
        print(f"[{time.time() - started:4.0f} s] {name}: {res['tokens_per_s']:.0f} tokens/s, "
              f"{res['median_step_s']:.3f} s/step (the run took {time.time() - clock:.0f} s)",
              flush=True)
        if args.out:
            with open(os.path.join(args.out, "rows.json"), "w") as f:
                json.dump({"rows": rows, "missing": missing}, f, indent=1)
        return res

    def shape():
        """The shape switchyard resolved, for PyTorch to build the same model."""
        report = resolved(rows)
        if report is None:
            raise RuntimeError("no switchyard run finished, so the shape is unknown")
        return report

    def dense_twin(extra):
        # As wide as the active experts together.
        moe = shape()["moe"]
        return switchyard(args, extra + ["--set", "moe.num_experts=0",
                                         "--set", f"model.d_ff={moe['top_k'] * moe['d_expert']}"])

    # The headline pair first, then f32, then the optional rows.
    attempt("switchyard, bf16", lambda: switchyard(args, bf16))
    attempt("PyTorch eager, bf16 autocast",
            lambda: pytorch(args, shape(), torch_common + ["--dtype", "bf16"]))
    if not args.no_f32:
        attempt("switchyard, f32", lambda: switchyard(args, base + ["--profile"]))
        attempt("switchyard, f32, composed path", lambda: switchyard(
            args, base + ["--profile", "--set", "train.gpu_kernels=false"]))
        attempt("PyTorch eager, f32", lambda: pytorch(args, shape(), torch_common + ["--dtype", "f32"]))
    if args.bf16_composed:
        attempt("switchyard, bf16, composed path",
                lambda: switchyard(args, bf16 + ["--set", "train.gpu_kernels=false"]))
    if args.dense:
        if not args.no_f32:
            attempt("switchyard dense twin, f32", lambda: dense_twin(base))
        attempt("switchyard dense twin, bf16", lambda: dense_twin(bf16))
    if not args.no_fused:
        fused = ["--set", "train.gpu_fused_swiglu=true"]
        attempt("switchyard, bf16, fused SwiGLU", lambda: switchyard(args, bf16 + fused))
        if not args.no_f32:
            attempt("switchyard, f32, fused SwiGLU",
                    lambda: switchyard(args, base + ["--profile"] + fused))
    operations = None
    if not args.no_f32 and {"switchyard, f32", "switchyard, f32, composed path"} <= rows.keys():
        try:
            operations = per_operation(args, shape(), rows["switchyard, f32"],
                                       rows["switchyard, f32, composed path"],
                                       rows.get("switchyard, f32, fused SwiGLU"))
        except Exception as e:  # noqa: BLE001
            missing["per-operation table"] = f"failed: {e}"

    text = tables(args, rows, missing, operations)
    print("\n" + text)
    if args.out:
        with open(os.path.join(args.out, "tables.md"), "w") as f:
            f.write(text)


def resolved(rows):
    """The report of the switchyard run whose shape the others share: the
    bf16 run's, else the f32 run's; None before either finished."""
    return rows.get("switchyard, bf16") or rows.get("switchyard, f32")


def tables(args, rows, missing, operations):
    """The README tables from whatever rows finished."""
    out = []
    say = out.append
    if not rows:
        return "no run finished:\n" + "\n".join(f"- {k}: {v}" for k, v in missing.items())
    shape = resolved(rows) or next(iter(rows.values()))
    flops = shape["flops_per_step"]
    for name, res in rows.items():
        if abs(res["flops_per_step"] / flops - 1) > 0.01:
            say(f"note: {name} counts {res['flops_per_step'] / 1e12:.3f} TFLOP/step, "
                f"switchyard {flops / 1e12:.3f}; the table uses switchyard's")
    m = shape["model"]
    say(f"shape: {args.config}, d_model {m['d_model']}, {m['n_layers']} layers, seq {m['seq_len']}, "
        f"batch {shape['batch_size']}, {shape['moe']['num_experts']} experts top-{shape['moe']['top_k']}; "
        f"{shape['params'] / 1e6:.0f}M parameters, {shape['active_params'] / 1e6:.0f}M active, "
        f"{flops / 1e12:.2f} TFLOP/step\n")
    say(f"| run | tokens/s | s/step | model TFLOP/s | MFU (of {args.peak_tflops:g}) | device memory MiB |")
    say("|---|---|---|---|---|---|")
    for name, res in rows.items():
        tflops = flops / res["median_step_s"] / 1e12
        mem = res.get("device_reserved_mb") or res.get("peak_gpu_reserved_mb")
        mem = f"{mem:.0f}" if mem else f"({res['peak_rss_mb']:.0f} RSS)"
        say(f"| {name} | {res['tokens_per_s']:.0f} | {res['median_step_s']:.3f} | {tflops:.2f} | "
            f"{100 * tflops / args.peak_tflops:.2f}% | {mem} |")
    say("")

    def ratio(label, a, b, key="tokens_per_s"):
        if a in rows and b in rows:
            say(f"{label}: {rows[a][key] / rows[b][key]:.2f}")

    ratio("switchyard bf16 / PyTorch bf16 tokens/s", "switchyard, bf16", "PyTorch eager, bf16 autocast")
    ratio("switchyard f32 / PyTorch f32 tokens/s", "switchyard, f32", "PyTorch eager, f32")
    ratio("switchyard bf16 / f32 tokens/s", "switchyard, bf16", "switchyard, f32")
    ratio("switchyard f32, kernels / composed path tokens/s", "switchyard, f32",
          "switchyard, f32, composed path")
    ratio("switchyard bf16, kernels / composed path tokens/s", "switchyard, bf16",
          "switchyard, bf16, composed path")
    for dtype in ["f32", "bf16"]:
        ratio(f"MoE step / dense twin step ({dtype})", f"switchyard, {dtype}",
              f"switchyard dense twin, {dtype}", key="median_step_s")
    for dtype in ["f32", "bf16"]:
        ratio(f"fused SwiGLU / CubeCL matmuls and a SwiGLU pass tokens/s ({dtype})",
              f"switchyard, {dtype}, fused SwiGLU", f"switchyard, {dtype}")
    if operations:
        say("\n" + operations)
    sy = rows.get("switchyard, bf16")
    if sy and sy.get("phases"):
        say("\nswitchyard bf16 phases (each alone, forward + backward, all layers):")
        for p in sy["phases"]:
            say(f"  {p['name']:<44} {p['seconds'] * 1e3:9.2f} ms "
                f"{100 * p['seconds'] / sy['median_step_s']:5.1f}%")
    if missing:
        say("\nnot in the tables:")
        for k, v in missing.items():
            say(f"- {k}: {v.splitlines()[0]}")
    return "\n".join(out) + "\n"


def per_operation(args, shape, kernels, composed, fused=None):
    """One table, as text: each fused operation's time per step with
    switchyard's kernel, on the composed path, and in PyTorch
    (bench/pytorch_ops.py); with `fused` (the f32 run with
    train.gpu_fused_swiglu), the expert matmuls with the SwiGLU fused into
    switchyard's tiled matmul as one more row."""
    m, moe = shape["model"], shape["moe"]
    cmd = [args.python, os.path.join(ROOT, "bench/pytorch_ops.py"), "--device", args.torch_device,
           "--batch", shape["batch_size"], "--seq", m["seq_len"], "--d-model", m["d_model"],
           "--heads", m["n_heads"], "--kv-heads", m["n_kv_heads"], "--vocab", m["vocab_size"],
           "--experts", max(moe["num_experts"], 1), "--top-k", moe["top_k"],
           "--d-expert", moe["d_expert"], "--layers", m["n_layers"]]
    torch_ops = json.loads(run(cmd).strip().splitlines()[-1])
    pairs = {"attention": "attention", "LM head + loss": "LM head + loss",
             "expert matmuls": "expert matmuls (per-expert loop)",
             "optimizer": "optimizer (fused AdamW + clip)"}
    ms = lambda report, name: next(  # noqa: E731
        (1e3 * p["seconds"] for p in report["phases"] if p["name"] == name), float("nan"))
    out = ["per operation, f32, ms per training step (all layers), forward + backward:\n",
           "| operation | switchyard kernel | composed path | PyTorch | kernel / composed | kernel / PyTorch |",
           "|---|---|---|---|---|---|"]
    for ours, theirs in pairs.items():
        k, c = ms(kernels, ours), ms(composed, ours)
        t = torch_ops[theirs]["ms"] * torch_ops[theirs]["calls"]
        out.append(f"| {ours} | {k:.2f} | {c:.2f} | {t:.2f} | {k / c:.2f} | {k / t:.2f} |")
        if fused and ours == "expert matmuls":
            k = ms(fused, ours)
            out.append(f"| {ours}, fused SwiGLU | {k:.2f} | {c:.2f} | {t:.2f} | {k / c:.2f} | "
                       f"{k / t:.2f} |")
    norm = torch_ops["RMSNorm"]
    out.append(f"\nPyTorch RMSNorm: {norm['ms'] * norm['calls']:.2f} ms per step ({norm['calls']} calls); "
               "switchyard's norms are inside 'other' of the phase breakdown.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
