#!/usr/bin/env python3
"""Prefill and decode speed of llama.cpp (through llama-cpp-python) on a GGUF file, with the
same token ids and counts as `sae-ablate bench-model`, for a side-by-side ratio.

    python3 -m venv ~/.cache/sae-ablate/llamacpp-venv
    ~/.cache/sae-ablate/llamacpp-venv/bin/pip install llama-cpp-python==0.3.16   # builds llama.cpp (~10 min, 2 cores)
    ~/.cache/sae-ablate/llamacpp-venv/bin/python scripts/bench-llamacpp.py MODEL.gguf \
        [--prefill 128] [--decode 64] [--threads 2] [--repeat 5]

Prints one JSON line: best-of-`repeat` prefill and decode tokens/s (batch 1). Not needed by
the tests."""
import argparse
import json
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_ctx=a.prefill + a.decode + 8,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=max(a.prefill, 8),
        logits_all=False,
        verbose=False,
    )
    vocab = llm.n_vocab()
    # The ids `sae-ablate bench-model` uses.
    ids = [(i * 7919 + 13) % vocab for i in range(a.prefill + a.decode)]
    best_p, best_d = 0.0, 0.0
    for _ in range(a.repeat):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[: a.prefill])
        p = a.prefill / (time.perf_counter() - t)
        t = time.perf_counter()
        for tok in ids[a.prefill :]:
            llm.eval([tok])
        d = a.decode / (time.perf_counter() - t)
        best_p, best_d = max(best_p, p), max(best_d, d)
    print(json.dumps({
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "model": a.model,
        "threads": a.threads,
        "prefill_tokens": a.prefill,
        "decode_tokens": a.decode,
        "prefill_tok_s": round(best_p, 1),
        "decode_tok_s": round(best_d, 1),
    }))


if __name__ == "__main__":
    main()
