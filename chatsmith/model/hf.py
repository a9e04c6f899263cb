"""Hugging Face weight layouts.

Llama shape: our module names are LlamaForCausalLM's, so the state dict maps 1:1.
GPT-2 shape: HF stores q/k/v fused in `c_attn` and uses Conv1D, whose weight is (in, out), the
transpose of nn.Linear's; we convert both ways here.
"""

from __future__ import annotations

import torch

from chatsmith.config import ModelConfig


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # tied: HF re-ties it on load; safetensors refuses shared storage
    if cfg.arch == "llama":
        return {k: v.contiguous() for k, v in sd.items()}
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"],
           "transformer.ln_f.bias": sd["model.norm.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    if "score.weight" in sd:
        out["score.weight"] = sd["score.weight"]
    for i in range(cfg.n_layer):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[h + theirs + ".weight"] = sd[p + ours + ".weight"]
            out[h + theirs + ".bias"] = sd[p + ours + ".bias"]
        a = p + "self_attn."
        out[h + "attn.c_attn.weight"] = torch.cat([sd[a + n + "_proj.weight"] for n in "qkv"], 0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[a + n + "_proj.bias"] for n in "qkv"], 0)
        out[h + "attn.c_proj.weight"] = sd[a + "o_proj.weight"].t()
        out[h + "attn.c_proj.bias"] = sd[a + "o_proj.bias"]
        out[h + "mlp.c_fc.weight"] = sd[p + "mlp.up_proj.weight"].t()
        out[h + "mlp.c_fc.bias"] = sd[p + "mlp.up_proj.bias"]
        out[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"].t()
        out[h + "mlp.c_proj.bias"] = sd[p + "mlp.down_proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (lm_head filled from the embedding when tied)."""
    if cfg.arch == "llama":
        out = dict(sd)
    else:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        d = cfg.d_model
        out = {"model.embed_tokens.weight": sd["wte.weight"],
               "model.embed_positions.weight": sd["wpe.weight"],
               "model.norm.weight": sd["ln_f.weight"], "model.norm.bias": sd["ln_f.bias"]}
        for name in ("lm_head.weight", "score.weight"):
            if name in sd:
                out[name] = sd[name]
        for i in range(cfg.n_layer):
            p, h = f"model.layers.{i}.", f"h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                out[p + ours + ".weight"] = sd[h + theirs + ".weight"]
                out[p + ours + ".bias"] = sd[h + theirs + ".bias"]
            w, b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
            for j, n in enumerate("qkv"):
                out[p + f"self_attn.{n}_proj.weight"] = w[j * d:(j + 1) * d]
                out[p + f"self_attn.{n}_proj.bias"] = b[j * d:(j + 1) * d]
            out[p + "self_attn.o_proj.weight"] = sd[h + "attn.c_proj.weight"].t()
            out[p + "self_attn.o_proj.bias"] = sd[h + "attn.c_proj.bias"]
            out[p + "mlp.up_proj.weight"] = sd[h + "mlp.c_fc.weight"].t()
            out[p + "mlp.up_proj.bias"] = sd[h + "mlp.c_fc.bias"]
            out[p + "mlp.down_proj.weight"] = sd[h + "mlp.c_proj.weight"].t()
            out[p + "mlp.down_proj.bias"] = sd[h + "mlp.c_proj.bias"]
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}
