"""Reference token ids for a SentencePiece ("llama") GGUF vocabulary.

Run by make-tokenizer-fixtures.sh inside its pinned virtual environment:
    python make-tokenizer-fixtures.py MODEL.gguf OUT.json

Two implementations, both independent of the crate:
  * llama.cpp (through llama-cpp-python, vocab only): `tokenize(text, add_bos=True, special=True)`,
    the ids the crate must reproduce;
  * HF transformers' GGUF conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`),
    which rebuilds the vocabulary as a Unigram model: recorded next to the llama.cpp ids,
    with a flag saying whether the two agree.
"""

import hashlib
import json
import os
import sys

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
    # U+13000 EGYPTIAN HIEROGLYPH A001 and U+E000 (private use): not in the vocabulary,
    # so each is spelled as its UTF-8 bytes (<0xF0><0x93>...).
    ("byte_fallback", "Hieroglyph \U00013000 and private \ue000 use"),
    ("special_tokens", "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"),
    ("user_defined", "Bold <b>text</b> in a <table>"),
    ("empty", ""),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def llama_cpp_reference(path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    def enc(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def dec(ids, special):
        return llm.detokenize(ids, special=special).decode("utf-8", errors="replace")

    return llama_cpp.__version__, enc, dec


def hf_reference(path):
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoTokenizer

    # transformers refuses to parse GGUF metadata without torch, although the tokenizer
    # path reads no tensor (return_tensors=False): skip the check instead of installing torch.
    gguf_utils.is_torch_available = lambda: True

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))

    def enc(text):
        return tok(text, add_special_tokens=True)["input_ids"]

    return transformers.__version__, enc


def main():
    model, out = sys.argv[1], sys.argv[2]
    ll_version, ll_enc, ll_dec = llama_cpp_reference(model)
    hf_version, hf_enc = hf_reference(model)
    cases = []
    for name, text in TEXTS:
        ids = ll_enc(text)
        hf_ids = hf_enc(text)
        body = ids[1:] if ids and ids[0] == 2 else ids
        cases.append({
            "name": name,
            "text": text,
            "ids": ids,
            "decoded": ll_dec(body, True),
            "decoded_skip_special": ll_dec(body, False),
            "hf_ids": hf_ids,
            "hf_agrees": hf_ids == ids,
        })
        flag = "agree" if hf_ids == ids else "DISAGREE"
        print(f"{name:18} {len(ids):4} ids  llama.cpp vs transformers: {flag}", file=sys.stderr)
    byte_case = next(c for c in cases if c["name"] == "byte_fallback")
    assert any(238 <= i <= 493 for i in byte_case["ids"]), "byte_fallback text produced no byte token"
    fixture = {
        "model": os.path.basename(model),
        "sha256": sha256(model),
        "reference": f"llama-cpp-python {ll_version}: Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)",
        "hf_reference": f"transformers {hf_version}: AutoTokenizer.from_pretrained(gguf_file=...)(text)",
        "bos_id": 2,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(out + ".tmp", out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
