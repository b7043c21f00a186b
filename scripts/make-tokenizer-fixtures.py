"""Reference token ids for a SentencePiece ("llama") GGUF vocabulary: Gemma 3 270M.

Run by make-tokenizer-fixtures.sh inside its pinned virtual environment:
    python make-tokenizer-fixtures.py MODEL.gguf NOVEL.txt OUT.json

Two implementations, both independent of the crate, must agree on every text:
  * llama.cpp (through llama-cpp-python, vocabulary only):
    `Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`;
  * HF transformers' GGUF conversion: `GemmaTokenizer.from_pretrained(dir, gguf_file=...)`, the
    class `AutoTokenizer` picks for Gemma. transformers 5 rebuilds the vocabulary as a BPE whose
    merges follow the token order of the file, with byte fallback and the control /
    user-defined tokens added whole. (transformers 4.x built a Unigram model from the same
    scores and disagreed with llama.cpp on almost every text.)

For each short text the fixture holds the ids (with the BOS the tokenizer adds) and llama.cpp's
decoding of them; for a whole novel, the number of ids and the SHA-256 of the ids as
little-endian u32s, so the full sequence is checked without storing it.
"""

import hashlib
import json
import os
import re
import struct
import sys
import time
import types

BOS = 2

TEXTS = [
    ("austen", "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."),
    ("austen_paragraphs",
     "However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
     "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
     "property of some one or other of their daughters.\n\n"
     "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let at last?\"\n\n"
     "Mr. Bennet replied that he had not."),
    ("digits", "In 1813, 42 and 3.14"),
    ("spaces_tabs", "two  spaces, three   spaces,\ttab,\t\ttwo tabs, trailing  "),
    ("newlines", "First line.\nSecond line.\n\nNew paragraph.\n"),
    ("leading_space", " leading space"),
    ("unicode", "Caf\u00e9 \u00e9t\u00e9, \u65e5\u672c\u8a9e, emoji \U0001F642"),
    # U+13000 EGYPTIAN HIEROGLYPH A001 is not in the vocabulary: it is spelled as the byte
    # tokens of its UTF-8 bytes <0xF0><0x93><0x80><0x80>.
    ("byte_fallback", "Hieroglyph \U00013000 and private \ue000 use"),
    ("special_tokens", "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"),
    ("user_defined", "Bold <b>text</b> in a <table>"),
    ("empty", ""),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ids_sha256(ids):
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()


def llama_cpp_reference(path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    def enc(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def dec(ids, special):
        return llm.detokenize(ids, special=special).decode("utf-8", errors="replace")

    return f"llama-cpp-python {llama_cpp.__version__}", enc, dec


def hf_reference(path):
    import transformers
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    # transformers' GGUF reader imports torch for its tensor dtypes, which the tokenizer
    # never touches. A stand-in module avoids installing torch; it is put in place after
    # transformers has been imported, so transformers itself still sees no torch.
    class _Unused:
        def __getattr__(self, name):
            return _Unused()

        def __call__(self, *args, **kwargs):
            return _Unused()

    stub = types.ModuleType("torch")
    stub.__getattr__ = lambda name: _Unused()
    sys.modules.setdefault("torch", stub)

    tok = GemmaTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))

    def enc(text):
        return tok(text, add_special_tokens=True)["input_ids"]

    return f"transformers {transformers.__version__}", enc


def main():
    model, novel, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ll_name, ll_enc, ll_dec = llama_cpp_reference(model)
    hf_name, hf_enc = hf_reference(model)
    disagreements = []
    cases = []
    for name, text in TEXTS:
        ids = ll_enc(text)
        if hf_enc(text) != ids:
            disagreements.append(name)
        body = ids[1:] if ids[:1] == [BOS] else ids
        cases.append({
            "name": name,
            "text": text,
            "ids": ids,
            "decoded": ll_dec(body, True),
            "decoded_skip_special": ll_dec(body, False),
        })
        print(f"{name:18} {len(ids):4} ids", file=sys.stderr)
    byte_case = next(c for c in cases if c["name"] == "byte_fallback")
    assert any(238 <= i <= 493 for i in byte_case["ids"]), "byte_fallback text produced no byte token"

    with open(novel, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    ids = ll_enc(text)
    t_ll = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_ids = hf_enc(text)
    t_hf = time.perf_counter() - t0
    if hf_ids != ids:
        disagreements.append(os.path.basename(novel))
    print(f"{os.path.basename(novel)}: {len(text.encode())} bytes, {len(ids)} ids; "
          f"llama.cpp {t_ll:.2f} s, transformers {t_hf:.2f} s", file=sys.stderr)
    if disagreements:
        sys.exit(f"llama.cpp and transformers disagree on: {', '.join(disagreements)}")

    fixture = {
        "model": os.path.basename(model),
        "sha256": sha256_file(model),
        "reference": f"{ll_name}: Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)",
        "agreeing_reference": f"{hf_name}: GemmaTokenizer.from_pretrained(dir, gguf_file=...)(text)",
        "bos_id": BOS,
        "cases": cases,
        "novel": {
            "file": os.path.basename(novel),
            "sha256": sha256_file(novel),
            "n_ids": len(ids),
            "ids_sha256_le_u32": ids_sha256(ids),
            "first_ids": ids[:32],
            "last_ids": ids[-32:],
        },
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    text = json.dumps(fixture, ensure_ascii=False, indent=1)
    # One line per id list.
    text = re.sub(r"\[\s*\d+(?:,\s*\d+)*\s*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(out + ".tmp", out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
