"""Run switchyard's benchmark and the PyTorch reference side by side and print
the README table.

    python3 bench/compare.py --python /path/to/python-with-torch [--rounds 2]

switchyard runs from target/release/switchyard (build it first with
`cargo build --release`). The runs alternate (switchyard MoE, dropless, dense,
PyTorch MoE, dense) for --rounds rounds, and each cell is the best median of
its rounds, so a burst of load on the machine skews the ratios less.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    """Run a command from the repository root and return its stdout; on
    failure raise with the command and the end of what it printed."""
    # The error itself, not a backtrace, is what the tail must hold.
    env = dict(os.environ, RUST_BACKTRACE="0")
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


def switchyard(args, extra):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        run([args.binary, "bench", "--json", f.name, "--steps", str(args.steps)] + extra)
        return json.load(open(f.name))


def shape_args(report):
    """pytorch_reference.py flags for the shape a switchyard bench report ran.

    The reference is transformers' Mixtral (or Mistral without experts), so a
    shape it cannot express is refused rather than silently benchmarked as
    something else."""
    m, moe = report["model"], report["moe"]
    plain = {"every_n_layers": 1, "first_k_dense": 0, "layers": None, "score": "softmax",
             "topk_order": "softmax_then_topk", "normalize_topk": True, "num_shared_experts": 0}
    bad = [f"moe.{k} = {moe[k]!r}" for k, v in plain.items() if moe["num_experts"] and moe[k] != v]
    bad += [f"model.{k} = {m[k]!r}" for k in ("tie_embeddings", "qkv_bias") if m[k]]
    if m["head_dim"] not in (None, m["d_model"] // m["n_heads"]):
        bad.append(f"model.head_dim = {m['head_dim']}")
    if bad:
        sys.exit("the PyTorch reference (Mixtral/Mistral) has no equivalent of " + ", ".join(bad))
    args = ["--vocab", m["vocab_size"], "--d-model", m["d_model"], "--layers", m["n_layers"],
            "--heads", m["n_heads"], "--kv-heads", m["n_kv_heads"], "--seq", m["seq_len"],
            "--batch", report["batch_size"]]
    if moe["num_experts"]:
        args += ["--model", "moe", "--experts", moe["num_experts"], "--top-k", moe["top_k"],
                 "--d-expert", moe["d_expert"], "--aux-coef", moe["aux_loss_coef"],
                 "--z-coef", moe["z_loss_coef"]]
    else:
        args += ["--model", "dense", "--d-ff", m["d_ff"]]
    return [str(a) for a in args]


def pytorch(args, report, extra=()):
    """The PyTorch reference at the shape of a switchyard bench report."""
    cmd = [args.python, os.path.join(ROOT, "bench/pytorch_reference.py"),
           "--threads", str(args.threads), "--steps", str(args.steps)]
    cmd += shape_args(report) + list(extra)
    return json.loads(run(cmd).strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/switchyard"),
                    help="the switchyard binary to run (default: the release build)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    runs = {
        "switchyard MoE (cf 1.25)": lambda: switchyard(args, ["--config", "configs/bench-moe.toml"]),
        "switchyard MoE (dropless)": lambda: switchyard(
            args, ["--config", "configs/bench-moe.toml", "--set", "moe.drop_policy=dropless", "--no-sgemm"]),
        "switchyard dense twin": lambda: switchyard(args, ["--config", "configs/bench-dense.toml", "--no-sgemm"]),
        # The references take their shapes from switchyard's reports of this round.
        "PyTorch Mixtral (dropless)": lambda: pytorch(args, this["switchyard MoE (cf 1.25)"]),
        "PyTorch Mistral dense twin": lambda: pytorch(args, this["switchyard dense twin"]),
    }
    best = {}
    rounds = []
    for r in range(args.rounds):
        this = {}
        for name, fn in runs.items():
            res = fn()
            this[name] = res
            print(f"round {r + 1}: {name}: {res['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
            if name not in best or res["median_step_s"] < best[name]["median_step_s"]:
                best[name] = res
        rounds.append(this)
    # The machine's speed drifts between rounds; the fastest sgemm seen is
    # the ceiling, and each round's own ratios are printed beside the table.
    sgemm = max((r["switchyard MoE (cf 1.25)"].get("sgemm_gflops") or 0) for r in rounds) or None
    torch_moe = best["PyTorch Mixtral (dropless)"]["tokens_per_s"]
    print("| run | tokens/s | s/step | × PyTorch MoE | model GFLOP/s | % of sgemm | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, res in best.items():
        gflops = res["flops_per_step"] / res["median_step_s"] / 1e9
        share = f"{100 * gflops / sgemm:.0f}%" if sgemm else ""
        print(f"| {name} | {res['tokens_per_s']:.0f} | {res['median_step_s']:.3f} | "
              f"{res['tokens_per_s'] / torch_moe:.2f} | {gflops:.1f} | {share} | {res['peak_rss_mb']:.0f} |")
    moe = best["switchyard MoE (cf 1.25)"]["median_step_s"]
    dense = best["switchyard dense twin"]["median_step_s"]
    print(f"\nswitchyard MoE step / dense step: {moe / dense:.2f}")
    print(f"PyTorch MoE step / dense step: "
          f"{best['PyTorch Mixtral (dropless)']['median_step_s'] / best['PyTorch Mistral dense twin']['median_step_s']:.2f}")
    print(f"sgemm ceiling (flex, 1024³ f32, best round): {sgemm:.1f} GFLOP/s")
    ratios = sorted(r["switchyard MoE (cf 1.25)"]["tokens_per_s"] / r["PyTorch Mixtral (dropless)"]["tokens_per_s"]
                    for r in rounds)
    print("switchyard MoE / PyTorch MoE tokens/s, round by round: "
          + ", ".join(f"{x:.2f}" for x in ratios) + f" (median {ratios[len(ratios) // 2]:.2f})")


if __name__ == "__main__":
    main()
