"""Batched forward throughput of HF transformers on the work `sae-ablate harvest` and
`bench-model --prefill-batch` do: B contexts of T tokens per pass, the first L decoder layers.

Usage (a venv with torch, transformers and gguf; not needed by the tests):
    python scripts/compare_transformers.py --gguf ~/.cache/sae-ablate/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dtype bfloat16 --batch 8 --tokens 128 --layers 16

The GGUF is dequantized by transformers at load (the same dense weights the crate's
`--weights dense` uses), cast to --dtype; --layers keeps the first L decoder layers (a harvest at
blocks.{L-1}.hook_resid_post needs no more), 0 = all, in which case the LM head runs on the last
position only (as `bench-model`'s prefill). Prints the best and the mean of --repeat passes (after
one warm-up pass) in tokens/s: the best is what `bench-model` reports; the mean is the rate of a
harvest's run of passes.
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = os.path.expanduser(a.gguf)
    m = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, a.dtype)
    )
    m.eval()
    if a.layers:
        m.model.layers = m.model.layers[: a.layers]
        m.config.num_hidden_layers = a.layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (a.batch, a.tokens), generator=g)
    with torch.inference_mode():
        run = (lambda: m.model(input_ids=ids)) if a.layers else (lambda: m(input_ids=ids, logits_to_keep=1))
        run()
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    n = a.batch * a.tokens
    best, mean = min(times), sum(times) / len(times)
    print(f"transformers, torch {torch.__version__}, threads {torch.get_num_threads()}, {a.dtype}, "
          f"{a.batch}x{a.tokens}, layers {a.layers or 'all'}: {best:.3f} s = {n / best:.1f} tok/s "
          f"(best of {a.repeat}); mean {mean:.3f} s = {n / mean:.1f} tok/s")


if __name__ == "__main__":
    main()
