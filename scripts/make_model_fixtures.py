#!/usr/bin/env python3
"""Regenerate the model test fixtures (run through scripts/make-model-fixtures.sh).

  models       tests/fixtures/models/<case>/{config.json, model.safetensors, reference.json}
               tiny seeded random-weight checkpoints of each supported HF model family and
               their reference outputs from HF transformers (eager attention, float32).
  gemma3-270m  tests/fixtures/gemma3-270m/reference.json: token ids and logits of Gemma 3 270M,
               computed by HF transformers from the Q4_K_M GGUF dequantized to float32.
  verify-tf4   reload every fixture whose config.json is in the transformers 4.x form with a
               transformers 4.x install (run by make-model-fixtures.sh in a second environment)
               and check it reproduces reference.json.

Everything is seeded; rerunning rewrites the same files.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
GEMMA_OUT = ROOT / "tests" / "fixtures" / "gemma3-270m"
GGUF_DIR = ROOT / "assets" / "gemma-3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

BATCH, SEQ, GREEDY = 2, 24, 8
WINDOW = 8
DIMS = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
TF4_VERSION = "4.57.6"
# Init gains: layer outputs large enough next to the token embedding that the residual
# stream is really transformed (otherwise a tied head just echoes the current token).
MIX = {"o_proj": 3.0, "down_proj": 3.0}
GEMMA_EMB_STD = 0.25
TIED_EMB_STD = 0.4  # Gemma scales embeddings by sqrt(hidden_size) = 8


# ----------------------------------------------------------------------------- helpers


def r6(x):
    """Nested lists of floats rounded to 6 significant digits (ints are kept)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).cpu().numpy()
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.integer):
            return x.tolist()
        x = x.tolist()
    if isinstance(x, list):
        return [r6(v) for v in x]
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"non-finite value {x}")
        return float(f"{x:.6g}")
    return x


def dump_json(path: Path, obj: dict):
    """One top-level key per line, values compact: small files, readable diffs."""
    lines = []
    for k, v in obj.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'), ensure_ascii=False)}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def load_model(cls, path, **kw):
    m, info = cls.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True, **kw
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{path}: {bad}"
    return m.eval()


def randomise(model, seed: int, gemma: bool, emb_std: float, gains: dict[str, float]):
    """Overwrite every parameter with seeded normal values.

    Norm weights: normal(0, 0.5) for Gemma (used as 1 + w), 1 + normal(0, 0.5) otherwise;
    the final norm's multiplier (w, or 1 + w for Gemma) is normal(0, 1).
    Biases: normal(0, 0.2). Embeddings: normal(0, emb_std). Other weights:
    normal(0, gain / sqrt(fan_in)), gain from the first key of `gains` found in the name.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name in ("model.norm.weight", "model.language_model.norm.weight"):
                # Final norm: multiplier normal(0, 1), random signs, so that a tied head does
                # not just echo the current token (its own embedding dominates the residual).
                val = noise + (-1.0 if gemma else 0.0)
            elif p.ndim == 1 and "norm" in name:
                val = noise * 0.5 + (0.0 if gemma else 1.0)
            elif name.endswith("bias") or p.ndim == 1:
                val = noise * 0.2
            elif "embed_tokens" in name or "embedding" in name:
                val = noise * emb_std
            else:
                gain = next((v for k, v in gains.items() if k in name), 1.0)
                fan_in = p.shape[-1] if p.ndim == 2 else int(np.prod(p.shape[1:]))
                val = noise * (gain / math.sqrt(fan_in))
            p.copy_(val)


def text_model_of(model):
    """The decoder stack (has .layers and .norm)."""
    m = model.model
    return getattr(m, "language_model", m)


@torch.no_grad()
def run_reference(model, input_ids: torch.Tensor):
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    logits = out.logits.float()
    hs = [h.float() for h in out.hidden_states]
    # Residual after the last layer, before the final norm (captured with a hook), to
    # document that hidden_states[-1] is the normed one.
    captured = {}
    tm = text_model_of(model)

    def hook(_mod, inp, _out):
        captured["pre_norm"] = inp[0].detach().float()

    h = tm.norm.register_forward_hook(hook)
    model(input_ids=input_ids, use_cache=False)
    h.remove()
    pre = captured["pre_norm"]
    normed = tm.norm(pre)
    last_is_normed = bool(torch.allclose(hs[-1], normed, atol=1e-5, rtol=1e-5))
    last_is_pre = bool(torch.allclose(hs[-1], pre, atol=1e-5, rtol=1e-5))
    return logits, hs, pre, last_is_normed, last_is_pre


@torch.no_grad()
def greedy(model, ids0: torch.Tensor, n: int):
    """n greedy tokens continuing ids0 [1, seq], with the KV cache (generate) and without
    (full recomputation each step); both must agree."""
    gen = model.generate(
        input_ids=ids0,
        attention_mask=torch.ones_like(ids0),
        max_new_tokens=n,
        min_new_tokens=0,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
        num_beams=1,
    )[0, ids0.shape[1]:].tolist()
    seq = ids0.clone()
    plain = []
    for _ in range(n):
        nxt = int(model(input_ids=seq, use_cache=False).logits[0, -1].argmax())
        plain.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    if gen != plain:
        raise SystemExit(f"greedy with cache {gen} != without cache {plain}")
    return gen


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def variant_diff(model_dir: Path, cls, ids, ref_logits, edit) -> float:
    """Max |logit difference| between the fixture and the same weights under an edited config."""
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    edit(cfg)
    m = cls.from_pretrained(model_dir, config=cfg, attn_implementation="eager", dtype=torch.float32).eval()
    return float((logits_of(m, ids) - ref_logits).abs().max())


# ----------------------------------------------------------------------------- 4.x config forms


def rope_to_tf4(cfg: dict) -> dict:
    """rope_parameters -> rope_theta (+ rope_scaling, + rope_local_base_freq for Gemma 3);
    dtype -> torch_dtype."""
    cfg = dict(cfg)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    rp = cfg.pop("rope_parameters")
    if "full_attention" in rp:
        full, local = dict(rp["full_attention"]), dict(rp["sliding_attention"])
        cfg["rope_theta"] = full.pop("rope_theta")
        cfg["rope_local_base_freq"] = local.pop("rope_theta")
        assert local.get("rope_type", "default") == "default"
        cfg["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
    else:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    return cfg


def sorted_cfg(cfg: dict) -> dict:
    return {k: (sorted_cfg(v) if isinstance(v, dict) else v) for k, v in sorted(cfg.items())}


def tf4_llama(cfg):
    return rope_to_tf4(cfg)


def tf4_qwen2(cfg):
    cfg = rope_to_tf4(cfg)
    # As published Qwen2/2.5 configs: a sliding_window value that use_sliding_window=false
    # switches off, and no layer_types.
    cfg.pop("layer_types", None)
    cfg["sliding_window"] = WINDOW
    cfg["use_sliding_window"] = False
    return cfg


def tf4_gemma2(cfg):
    cfg = rope_to_tf4(cfg)
    # Implicit alternation (even layers sliding) as in published Gemma 2 configs.
    lt = cfg.pop("layer_types")
    assert lt == ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(lt))], lt
    cfg["cache_implementation"] = "hybrid"
    cfg.pop("use_bidirectional_attention", None)
    return cfg


def tf4_gemma3_text(cfg):
    cfg = rope_to_tf4(cfg)
    lt = cfg.pop("layer_types")
    pattern = cfg.pop("_sliding_window_pattern", 6)
    assert lt == ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(lt))], lt
    cfg["sliding_window_pattern"] = pattern
    cfg["cache_implementation"] = "hybrid"
    cfg.pop("use_bidirectional_attention", None)
    return cfg


def tf4_gemma3(cfg):
    cfg = dict(cfg)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["text_config"] = tf4_gemma3_text(cfg["text_config"])
    vc = cfg["vision_config"] = dict(cfg["vision_config"])
    if "dtype" in vc:
        vc["torch_dtype"] = vc.pop("dtype")
    return cfg


# ----------------------------------------------------------------------------- cases


def cases():
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    d = DIMS
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    gemma3_text_kw = dict(
        d,
        num_hidden_layers=7,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )
    vision_kw = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        num_channels=3,
        vision_use_head=False,
    )
    return [
        dict(
            name="llama",
            cls=LlamaForCausalLM,
            config=lambda: LlamaConfig(**d, num_hidden_layers=2, rope_parameters=llama3_rope, tie_word_embeddings=False),
            tf4=tf4_llama,
            gains={**MIX, "lm_head": 4.0},
            emb_std=1.0,
            exercises="Llama, llama3 RoPE scaling (factor 8, low 1, high 4, original_max 64, theta 5e5: with head_dim 16 "
            "frequency 0 is kept, 1 is smoothed, 2..7 are divided by 8), untied lm_head, GQA 4:2; config.json in the "
            "transformers 4.x form (rope_theta + rope_scaling)",
        ),
        dict(
            name="llama_tf5",
            cls=LlamaForCausalLM,
            config=lambda: LlamaConfig(
                **d, num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True
            ),
            tf4=None,
            gains=MIX,
            emb_std=TIED_EMB_STD,
            exercises="Llama with config.json in the transformers 5.x form (rope_parameters), tied embeddings "
            "(no lm_head.weight tensor)",
        ),
        dict(
            name="mistral",
            cls=MistralForCausalLM,
            config=lambda: MistralConfig(
                **d, num_hidden_layers=2, sliding_window=WINDOW, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False,
            ),
            tf4=tf4_llama,
            gains={**MIX, "lm_head": 4.0},
            emb_std=1.0,
            window_check=lambda c: setattr(c, "sliding_window", None),
            exercises=f"Mistral, sliding_window {WINDOW} on every layer (inputs are {SEQ} tokens), untied; 4.x form (rope_theta)",
        ),
        dict(
            name="qwen2",
            cls=Qwen2ForCausalLM,
            config=lambda: Qwen2Config(
                **d, num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=True, use_sliding_window=False, max_window_layers=28,
            ),
            tf4=tf4_qwen2,
            gains=MIX,
            emb_std=TIED_EMB_STD,
            exercises=f"Qwen2, q/k/v biases (o_proj none), tied; 4.x form as published Qwen2.5 configs: sliding_window "
            f"{WINDOW} is present but use_sliding_window false, so attention is full causal",
        ),
        dict(
            name="qwen3",
            cls=Qwen3ForCausalLM,
            config=lambda: Qwen3Config(
                **dict(d, head_dim=24), num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=True,
            ),
            tf4=None,
            gains=MIX,
            emb_std=TIED_EMB_STD,
            exercises="Qwen3, per-head RMSNorm on q and k (q_norm/k_norm, before RoPE), head_dim 24 != hidden/heads = 16 "
            "(q_proj 64->96, o_proj 96->64), tied; 5.x form (rope_parameters, layer_types)",
        ),
        dict(
            name="gemma2",
            cls=Gemma2ForCausalLM,
            config=lambda: Gemma2Config(
                **d, num_hidden_layers=3, sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                query_pre_attn_scalar=24, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            ),
            tf4=tf4_gemma2,
            gains={**MIX, "q_proj": 3.0, "k_proj": 3.0},
            emb_std=GEMMA_EMB_STD,
            gemma=True,
            window_check=lambda c: setattr(c, "sliding_window", 4096),
            softcap_checks={
                "attn_logit_softcapping": lambda c: setattr(c, "attn_logit_softcapping", None),
                "final_logit_softcapping": lambda c: setattr(c, "final_logit_softcapping", None),
            },
            exercises=f"Gemma 2: (1 + w) RMSNorm with random w, embeddings x sqrt(64), pre and post norms around attention "
            f"and MLP, tanh-GELU gated MLP, sliding_window {WINDOW} on even layers (implicit alternation of the 4.x form), "
            "attention logit soft-cap 5 and final logit soft-cap 3 (both change the logits), query_pre_attn_scalar 24 "
            "!= head_dim 16, tied",
        ),
        dict(
            name="gemma3_text",
            cls=Gemma3ForCausalLM,
            config=lambda: Gemma3TextConfig(**gemma3_text_kw),
            tf4=tf4_gemma3_text,
            gains=MIX,
            emb_std=GEMMA_EMB_STD,
            gemma=True,
            window_check=lambda c: setattr(c, "sliding_window", 4096),
            rope_check=lambda c: c.rope_parameters["sliding_attention"].update(rope_theta=1_000_000.0),
            exercises=f"Gemma 3 text (gemma3_text): 7 layers, 5 sliding : 1 global (layer 5 global, 6 sliding again), sliding_window {WINDOW}, "
            "local RoPE base 1e4 vs global 1e6, per-head q/k RMSNorm (1 + w), query_pre_attn_scalar 24 != head_dim 16, "
            "pre/post norms, tied; 4.x form (rope_theta, rope_local_base_freq, sliding_window_pattern 6, no layer_types)",
        ),
        dict(
            name="gemma3_text_tf5",
            same_weights_as="gemma3_text",
            exercises="the gemma3_text checkpoint (same model.safetensors, same reference.json: symlinks) with config.json "
            "in the 5.x form transformers writes (rope_parameters per layer type, layer_types, _sliding_window_pattern)",
        ),
        dict(
            name="gemma3",
            cls=Gemma3ForConditionalGeneration,
            config=lambda: Gemma3Config(
                text_config=dict(gemma3_text_kw, num_hidden_layers=2, model_type="gemma3_text"),
                vision_config=vision_kw,
                mm_tokens_per_image=4,
            ),
            tf4=tf4_gemma3,
            # transformers 5.x saves the SigLIP tower as vision_tower.*; published Gemma 3
            # checkpoints (and transformers 4.x) use vision_tower.vision_model.*. 5.x loads both.
            rename=lambda k: "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k,
            gains=MIX,
            emb_std=GEMMA_EMB_STD,
            gemma=True,
            exercises="model_type gemma3 (Gemma3ForConditionalGeneration): the text model sits under text_config and its "
            "tensors under model.language_model.*; a tiny SigLIP vision tower and projector are present and unused; "
            "2 text layers (both sliding: pattern 6), text-only inputs",
        ),
    ]


def make_case(case, summary):
    name = case["name"]
    out_dir = MODELS / name
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    if "same_weights_as" in case:
        src = case["same_weights_as"]
        src_dir = MODELS / src
        tf5 = json.loads((src_dir / "config.tf5.json").read_text())
        (out_dir / "config.json").write_text(json.dumps(tf5, indent=2) + "\n")
        for f in ("model.safetensors", "reference.json"):
            (out_dir / f).symlink_to(Path("..") / src / f)
        ref = json.loads((src_dir / "reference.json").read_text())
        cls = getattr(transformers, ref["model_class"])
        m = load_model(cls, out_dir)
        ids = torch.tensor(ref["input_ids"])
        got = logits_of(m, ids)
        diff = float((got - torch.tensor(ref["logits"])).abs().max())
        assert diff < 1e-4, f"{name}: 5.x config gives logits {diff} away from {src}"
        summary.append(
            dict(case=name, cls=cls.__name__, layers=m.config.get_text_config().num_hidden_layers,
                 params=sum(p.numel() for p in m.parameters()), logit_std=float(got.std()),
                 logit_absmax=float(got.abs().max()), greedy=ref["greedy"],
                 note=f"= {src} with the 5.x config: max|dlogit| {diff:.1e}")
        )
        return

    cls = case["cls"]
    # Seeded; the first seed whose greedy continuation is not a single repeated token
    # (random models easily fall into a loop, which would hide KV-cache errors).
    for attempt in range(50):
        seed = sum(map(ord, name)) + 1000 * attempt
        torch.manual_seed(seed)
        cfg = case["config"]()
        model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
        randomise(model, seed, case.get("gemma", False), case["emb_std"], case["gains"])

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            shutil.copyfile(f"{tmp}/model.safetensors", out_dir / "model.safetensors")
            tf5_cfg = json.loads(Path(f"{tmp}/config.json").read_text())
        if "rename" in case:
            sd = load_file(out_dir / "model.safetensors")
            sd = {case["rename"](k): v for k, v in sd.items()}
            save_file(sd, out_dir / "model.safetensors", metadata={"format": "pt"})
        with safe_open(out_dir / "model.safetensors", "pt") as f:
            saved_names = sorted(f.keys())

        (out_dir / "config.json").write_text(json.dumps(tf5_cfg, indent=2) + "\n")
        model = load_model(cls, out_dir)  # everything below comes from the files on disk

        g = torch.Generator().manual_seed(seed + 1)
        ids = torch.randint(3, DIMS["vocab_size"], (BATCH, SEQ), generator=g)
        logits, hs, pre_norm, last_normed, last_pre = run_reference(model, ids)
        assert last_normed and not last_pre, f"{name}: hidden_states[-1] is not the final-normed residual"
        gen = greedy(model, ids[:1], GREEDY)
        if len(set(gen)) >= 4:
            break
        print(f"   seed {seed}: greedy {gen} loops, next seed", file=sys.stderr)
    else:
        raise SystemExit(f"{name}: no seed gave a non-degenerate greedy continuation")

    checks = {}
    notes = [
        "hidden_states is HF output_hidden_states: entry 0 is the input embedding (scaled by sqrt(hidden_size) for "
        "Gemma), entry i+1 the residual after layer i for i < n_layers-1, and the last entry is the residual after the "
        "last layer WITH the final norm applied; residual_final is that residual before the final norm.",
        f"Sliding windows (transformers masking_utils): query i attends key j iff i-{WINDOW} < j <= i, i.e. the last "
        f"{WINDOW} positions including itself.",
    ]
    if "window_check" in case:
        checks["max_abs_logit_change_without_sliding_window"] = r6(
            variant_diff(out_dir, cls, ids, logits, case["window_check"])
        )
        assert checks["max_abs_logit_change_without_sliding_window"] > 1e-3, f"{name}: window has no effect"
    for key, edit in case.get("softcap_checks", {}).items():
        checks[f"max_abs_logit_change_without_{key}"] = r6(variant_diff(out_dir, cls, ids, logits, edit))
        assert checks[f"max_abs_logit_change_without_{key}"] > 1e-2, f"{name}: {key} has no effect"
    if "rope_check" in case:
        checks["max_abs_logit_change_with_local_rope_base_1e6"] = r6(
            variant_diff(out_dir, cls, ids, logits, case["rope_check"])
        )
        assert checks["max_abs_logit_change_with_local_rope_base_1e6"] > 1e-3, f"{name}: local rope base has no effect"
    tf4_fn = case.get("tf4")
    if tf4_fn is not None:
        (out_dir / "config.tf5.json").write_text(json.dumps(tf5_cfg, indent=2) + "\n")
        tf4_cfg = sorted_cfg(tf4_fn(copy.deepcopy(tf5_cfg)))
        tf4_cfg["transformers_version"] = TF4_VERSION
        (out_dir / "config.json").write_text(json.dumps(tf4_cfg, indent=2) + "\n")
        m4 = load_model(cls, out_dir)
        d4 = float((logits_of(m4, ids) - logits).abs().max())
        assert d4 < 1e-5, f"{name}: the 4.x config.json changes the logits by {d4}"
        checks["max_abs_logit_change_4x_config_vs_5x_config"] = r6(d4)
        notes.append(
            "config.json is in the transformers 4.x form (rewritten by hand from what transformers "
            f"{transformers.__version__} saved, which is kept as config.tf5.json); transformers "
            f"{transformers.__version__} loads both to the same logits."
        )
    if name == "qwen2":
        d = variant_diff(out_dir, cls, ids, logits, lambda c: setattr(c, "sliding_window", None))
        assert d < 1e-6, d
        notes.append(f"config.json has sliding_window {WINDOW} with use_sliding_window false: no window is applied.")

    ref = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model_class": cls.__name__,
        "attn_implementation": "eager",
        "dtype": "float32",
        "seed": seed,
        "exercises": case["exercises"],
        "notes": notes,
        "checks": checks,
        "tensor_names": saved_names,
        "input_ids": ids.tolist(),
        "greedy": gen,
        "logits": r6(logits),
        "residual_final": r6(pre_norm),
        "hidden_states": r6(torch.stack(hs)),
    }
    dump_json(out_dir / "reference.json", ref)

    lg = logits
    nparams = sum(p.numel() for p in model.parameters())
    summary.append(
        dict(
            case=name,
            cls=cls.__name__,
            layers=cfg.get_text_config().num_hidden_layers,
            params=nparams,
            logit_std=float(lg.std()),
            logit_absmax=float(lg.abs().max()),
            greedy=gen,
            note="; ".join(f"{k.replace('max_abs_logit_change_', 'd|')}={v:.3g}" for k, v in checks.items()),
        )
    )


def cmd_models(args):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    MODELS.mkdir(parents=True, exist_ok=True)
    summary = []
    for case in cases():
        if args.only and case["name"] not in args.only and case.get("same_weights_as") not in args.only:
            continue
        print(f"== {case['name']}", file=sys.stderr)
        make_case(case, summary)
    print(f"\n{'case':<16} {'class':<32} {'L':>2} {'params':>7} {'std':>6} {'|max|':>6}  greedy / checks")
    for s in summary:
        print(
            f"{s['case']:<16} {s['cls']:<32} {s['layers']:>2} {s['params']:>7} {s['logit_std']:>6.2f} "
            f"{s['logit_absmax']:>6.2f}  {s['greedy']}  {s['note']}"
        )
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"\ntests/fixtures/models: {total / 1e6:.2f} MB (symlinks not counted)")


# ----------------------------------------------------------------------------- verify-tf4


def cmd_verify_tf4(args):
    """Load every 4.x-form fixture with the (4.x) transformers this interpreter has."""
    assert transformers.__version__.startswith("4."), transformers.__version__
    torch.set_num_threads(2)
    bad = 0
    for d in sorted(MODELS.iterdir()):
        if not (d / "config.tf5.json").exists():
            continue
        ref = json.loads((d / "reference.json").read_text())
        cls = getattr(transformers, ref["model_class"])
        m, info = cls.from_pretrained(
            d, attn_implementation="eager", torch_dtype=torch.float32, output_loading_info=True
        )
        m.eval()
        assert not any(info.values()), f"{d}: {info}"
        ids = torch.tensor(ref["input_ids"])
        with torch.no_grad():
            out = m(input_ids=ids, output_hidden_states=True, use_cache=False)
        dl = float((out.logits.float() - torch.tensor(ref["logits"])).abs().max())
        dh = float((torch.stack(out.hidden_states).float() - torch.tensor(ref["hidden_states"])).abs().max())
        gen = m.generate(
            input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=GREEDY, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, SEQ:].tolist()
        ok = dl < 1e-3 and dh < 1e-3 and gen == ref["greedy"]
        bad += not ok
        print(f"{d.name:<14} transformers {transformers.__version__}: max|dlogit| {dl:.2e} max|dhidden| {dh:.2e} "
              f"greedy {'ok' if gen == ref['greedy'] else gen}  {'OK' if ok else 'MISMATCH'}")
    if bad:
        raise SystemExit(f"{bad} fixture(s) do not reproduce under transformers {transformers.__version__}")


# ----------------------------------------------------------------------------- gemma3-270m


GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "The capital of France is",
    "In 1813, 3 of the 12 houses cost £4,500.75 each; call 555-0199 before 09:30.",
    "Multiple   spaces    here,  a\ttab, and   trailing  ",
    "Line one\nLine two\n\nLine four\n",
    "Café naïve résumé — 日本語のテキスト 😀👍🏽 ünïcödé",
    "<start_of_turn>user\nHello<end_of_turn>\n",
    " leading space",
]
GEMMA_PROMPT = "The capital of France is"
GEMMA_GREEDY = 16
GEMMA_TOPK = 20


def gguf_metadata(path: Path) -> dict:
    """All metadata keys of the GGUF except the large tokenizer arrays (their lengths instead)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list) and len(v) > 64:
            meta[k] = f"<array of {len(v)}>"
        elif isinstance(v, float):
            meta[k] = float(np.float32(v))
        else:
            meta[k] = v
    tt = {}
    for v in r.fields["tokenizer.ggml.token_type"].contents():
        tt[str(v)] = tt.get(str(v), 0) + 1
    meta["(tokenizer.ggml.token_type counts)"] = dict(sorted(tt.items()))
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    meta["(tensor types)"] = dict(sorted(types.items()))
    meta["(tensor count)"] = len(r.tensors)
    return meta


def sentencepiece_from_gguf(path: Path):
    """A SentencePiece BPE model rebuilt from the GGUF's tokenizer.ggml.{tokens,scores,token_type}
    (the arrays llama.cpp's converter copied out of Gemma's tokenizer.model): a second tokenizer
    implementation to cross-check transformers' ids."""
    import sentencepiece as spm
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    f = GGUFReader(str(path)).fields
    piece_type = pb.ModelProto.SentencePiece.Type
    tmap = {1: piece_type.NORMAL, 2: piece_type.UNKNOWN, 3: piece_type.CONTROL, 4: piece_type.USER_DEFINED,
            5: piece_type.UNUSED, 6: piece_type.BYTE}
    m = pb.ModelProto()
    for t, sc, ty in zip(f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.scores"].contents(),
                         f["tokenizer.ggml.token_type"].contents()):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, sc, tmap[ty]
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 3, 2, 1, 0
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False  # tokenizer.ggml.add_space_prefix = false
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def cmd_gemma3_270m(args):
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gguf_path = GGUF_DIR / GGUF_NAME
    if not gguf_path.exists():
        raise SystemExit(f"{gguf_path} is missing: run scripts/fetch-assets.sh gemma3 first")
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == GEMMA_SHA256, f"{gguf_path}: sha256 {h.hexdigest()} != {GEMMA_SHA256}"

    print("== gemma3-270m: tokenizer", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    sp = sentencepiece_from_gguf(gguf_path)
    texts = []
    for t in GEMMA_TEXTS:
        ids = tok(t).input_ids
        plain = tok(t, add_special_tokens=False).input_ids
        assert tok.decode(plain) == t, f"decode(encode({t!r})) = {tok.decode(plain)!r}"
        entry = dict(text=t, ids=ids, ids_no_special=plain, tokens_no_special=tok.convert_ids_to_tokens(plain))
        sp_ids = sp.encode(t)
        entry["sentencepiece_agrees"] = sp_ids == plain
        if sp_ids != plain:
            entry["ids_sentencepiece"] = sp_ids
        texts.append(entry)

    print("== gemma3-270m: model (dequantizing to float32)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config

    prompt_ids = tok(GEMMA_PROMPT, return_tensors="pt").input_ids
    assert prompt_ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = model(input_ids=prompt_ids, output_hidden_states=True, use_cache=False)
    logits = out.logits[0].float()  # [pos, vocab]
    last = logits[-1]
    top = last.topk(GEMMA_TOPK)
    slice_ids = sorted(set(range(64)) | set(range(0, cfg.vocab_size, 4096)))
    hs = torch.stack([h[0].float() for h in out.hidden_states])  # [L+1, pos, d]

    print("== gemma3-270m: greedy", file=sys.stderr)
    with torch.no_grad():
        gen = model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=GEMMA_GREEDY,
            do_sample=False, num_beams=1, use_cache=True, eos_token_id=None, pad_token_id=tok.pad_token_id,
        )[0, prompt_ids.shape[1]:].tolist()
        seq, plain = prompt_ids.clone(), []
        for _ in range(GEMMA_GREEDY):
            nxt = int(model(input_ids=seq, use_cache=False).logits[0, -1].argmax())
            plain.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert gen == plain, f"greedy with cache {gen} != without {plain}"

    meta = gguf_metadata(gguf_path)
    ref = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "sentencepiece": importlib.metadata.version("sentencepiece"),
        "source": f"assets/gemma-3-270m/{GGUF_NAME} (sha256 {GEMMA_SHA256})",
        "notes": [
            "Token ids: transformers' tokenizer built from the GGUF's tokenizer.ggml.* arrays "
            "(AutoTokenizer.from_pretrained(dir, gguf_file=...)). ids = tokenizer(text).input_ids (its default: "
            "BOS 2 prepended, no EOS); ids_no_special = tokenizer(text, add_special_tokens=False).input_ids. Special "
            "tokens written in the text (<start_of_turn> 105, <end_of_turn> 106) are matched as single tokens in "
            "both. decode(ids_no_special) == text for every text.",
            "Cross-check: a SentencePiece BPE model rebuilt from the same GGUF arrays (sentencepiece library, "
            "byte fallback, no dummy prefix) gives the same ids_no_special (sentencepiece_agrees) except where the "
            "text has runs of spaces or a tab (the GGUF's USER_DEFINED whitespace pieces hold raw spaces; "
            "transformers matches them on the raw text, SentencePiece only after turning spaces into U+2581, so "
            "it never uses them) or special tokens written as text (CONTROL pieces are plain text to "
            "SentencePiece); ids_sentencepiece is then given. transformers is the reference.",
            "Logits and hidden states: transformers Gemma3ForCausalLM loaded from the GGUF "
            "(AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)), every tensor dequantized to float32 by the "
            "gguf package (norm weights: the GGUF stores 1 + w, transformers subtracts 1), eager attention, float32 "
            "matmuls. Not the quantized matmuls of llama.cpp.",
            "Config transformers derived (the GGUF does not store the layer pattern, the local RoPE base or "
            "query_pre_attn_scalar; these are Gemma3TextConfig defaults): see config.",
            "prompt.* is for prompt.text with BOS; positions are prompt token positions. logits_slice[p][k] is the "
            "logit of token slice_ids[k] at position p. hidden_states_* follow HF output_hidden_states: entry 0 "
            "the scaled embedding, entry i+1 the residual after layer i, and the last entry has the final norm "
            "applied.",
            "greedy: generate() with the KV cache, identical to recomputing the full sequence each step; EOS does "
            "not stop it.",
        ],
        "config": {
            k: getattr(cfg, k)
            for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "sliding_window", "query_pre_attn_scalar",
                "rope_parameters", "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
                "hidden_activation", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "max_position_embeddings",
            )
        },
        "gguf_metadata": meta,
        "texts": texts,
        "prompt": {
            "text": GEMMA_PROMPT,
            "ids": prompt_ids[0].tolist(),
            "last_top20": [[int(i), r6(float(v))] for v, i in zip(top.values, top.indices)],
            "last_mean": r6(float(last.double().mean())),
            "last_std": r6(float(last.double().std(unbiased=False))),
            "last_argmax_text": tok.decode([int(top.indices[0])]),
            "slice_ids": slice_ids,
            "logits_slice": r6(logits[:, slice_ids]),
            "hidden_states_norm": r6(hs.norm(dim=-1)),
            "hidden_states_first8": r6(hs[:, :, :8]),
            "greedy_ids": gen,
            "greedy_text": tok.decode(gen),
        },
    }
    GEMMA_OUT.mkdir(parents=True, exist_ok=True)
    dump_json(GEMMA_OUT / "reference.json", ref)
    print(f"prompt ids {prompt_ids[0].tolist()}; top-5 {[(int(i), tok.decode([int(i)]), round(float(v), 3)) for v, i in zip(top.values[:5], top.indices[:5])]}")
    print(f"mean {float(last.mean()):.4f} std {float(last.std()):.4f}; greedy {gen} = {tok.decode(gen)!r}")
    for t in texts:
        print(f"{t['text']!r}: {t['ids']}")
    print(f"{GEMMA_OUT / 'reference.json'}: {(GEMMA_OUT / 'reference.json').stat().st_size / 1e3:.1f} kB")


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=["models", "gemma3-270m"], choices=["models", "gemma3-270m", "verify-tf4"])
    ap.add_argument("--only", nargs="*", help="model cases to regenerate (default: all)")
    args = ap.parse_args()
    for w in args.what:
        if w == "models":
            cmd_models(args)
        elif w == "gemma3-270m":
            cmd_gemma3_270m(args)
        else:
            cmd_verify_tf4(args)


if __name__ == "__main__":
    main()
