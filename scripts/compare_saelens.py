"""Side-by-side SAE throughput of SAELens (PyTorch) on the shapes `sae-ablate bench` times.

Usage (a venv with torch and sae-lens; not needed by the tests):
    python scripts/compare_saelens.py --size 8192x65536 --dtype bfloat16 --batch 1,256

Builds a random StandardSAE (ReLU) of the given size in the given dtype, inputs in the same
dtype, and prints the median wall time per call of
  * forward:  sae(x) (encode + decode),
  * ablate26: error-preserving zero-ablation of 26 latents, x + decode(f') - decode(f),
    the way a SAELens user writes it (SAELens has no |S|-column path).
Threads: torch.set_num_threads(--threads), default: all cores.
"""
import argparse
import statistics
import time

import torch
from sae_lens import StandardSAE, StandardSAEConfig


def median_ms(fn, budget_s):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="8192x65536")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", default="1,256")
    p.add_argument("--ops", default="forward,ablate26")
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d_in, d_sae = (int(v) for v in a.size.lower().split("x"))
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype=a.dtype, device="cpu")
    sae = StandardSAE(cfg)
    dt = getattr(torch, a.dtype)
    with torch.no_grad():
        bound = (3.0 / d_in) ** 0.5
        sae.W_enc.uniform_(-bound, bound)
        sae.W_dec.uniform_(-bound, bound)
        sae.b_enc.fill_(-2.43)  # about 75 of 65536 latents fire for N(0, 1) inputs
    ids = sorted({(i * 2521 + 17) % d_sae for i in range(26)})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {a.size} {a.dtype}")
    print(f"{'batch':>6} {'op':>9} {'ms':>10}")
    with torch.inference_mode():
        for b in (int(v) for v in a.batch.split(",")):
            x = torch.randn(b, d_in).to(dt)
            for op in a.ops.split(","):
                if op == "forward":
                    fn = lambda: sae(x)
                elif op == "ablate26":
                    def fn():
                        f = sae.encode(x)
                        f2 = f.clone()
                        f2[:, ids] = 0
                        return x + sae.decode(f2) - sae.decode(f)
                else:
                    raise SystemExit(f"unknown op {op}")
                print(f"{b:>6} {op:>9} {median_ms(fn, a.budget):>10.3f}", flush=True)


if __name__ == "__main__":
    main()
