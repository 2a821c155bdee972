"""Export a checkpoint's model to the Hugging Face layout (``msg-export``): GPT-2, GPT-NeoX or BERT.

Our GPT is GPT-2's architecture (pre-LN, learned positions, tied LM head) and
our BERT is BERT's (post-LN, token types, pooler, MLM transform with a tied
decoder, NSP), so once every MSG mask is 1 (the ramps are over) the logical
tensors map one to one onto ``GPT2LMHeadModel`` / ``BertForPreTraining``:
GPT-2's ``Conv1D`` layers store ``[in, out]`` (our Linear weights transposed);
BERT keeps Q, K and V as three Linears (our packed QKV rows are [3, heads,
head_dim], so the thirds).  A GPT with rotary positions is GPT-NeoX's architecture
with sequential residuals (``use_parallel_residual: false``, rotary on every feature,
rotate-half pairs as model/rotary.py): ``GPTNeoXForCausalLM``, whose fused QKV rows are
[heads, 3, head_dim].  BERT with rotary positions has no Hugging Face counterpart
(RoFormer rotates interleaved pairs) and is refused.  Refused too, with the reason: a checkpoint mid-ramp
(masks below 1 change the function, and Hugging Face has no masks), and a model
whose ``heads x head_dim`` differs from ``hidden`` (both libraries derive the
head size from the hidden size).

Writes ``config.json`` and ``model.safetensors`` (``pytorch_model.bin`` without the
safetensors package) into a temporary directory renamed into place.  The
tokenizer is not exported: token ids are megatron_msg's (docs/data.md).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_msg.checkpoint.io import Checkpoint, latest_checkpoint, open_checkpoint
from megatron_msg.config import ModelConfig
from megatron_msg.model.layout import tensor_spec


class ExportError(ValueError):
    """A checkpoint that cannot be exported (the message says why)."""


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return open_checkpoint(path)
    latest = latest_checkpoint(path)
    if latest is None:
        raise ExportError(f"{path}: neither a checkpoint (no state.pt) nor a run directory with checkpoints")
    return open_checkpoint(latest)


def _check_exportable(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    if cfg.arch == "bert" and cfg.position_embedding == "rope":
        raise ExportError(f"{ckpt.path}: BERT with rotary positions has no Hugging Face counterpart "
                          "(RoFormer rotates interleaved feature pairs, ours rotate halves)")
    if cfg.heads * cfg.head_dim != cfg.hidden:
        raise ExportError(f"{ckpt.path}: heads x head_dim = {cfg.heads} x {cfg.head_dim} != hidden {cfg.hidden}; "
                          "Hugging Face GPT-2 and BERT take the head size as hidden / heads")
    for name in ckpt.model:
        if tensor_spec(name).is_mask and not bool((ckpt.model[name] == 1).all()):
            ramp = ckpt.state.get("ramp") or {}
            end = ramp.get("start_step", 0) + ramp.get("phi", 0)
            raise ExportError(f"{ckpt.path}: step {ckpt.state['step']} is inside a growth ramp ({name} < 1); "
                              f"export a checkpoint from step {end} or later, when every mask is 1")


def _gpt2(cfg: ModelConfig, t) -> tuple[dict, dict]:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
              "n_positions": cfg.seq_len, "n_embd": cfg.hidden, "n_layer": cfg.layers, "n_head": cfg.heads,
              "n_inner": cfg.ffn, "activation_function": cfg.activation, "layer_norm_epsilon": cfg.eps,
              "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attention_dropout,
              "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": None, "eos_token_id": None}
    out = {"transformer.wte.weight": t("embed.tok.weight"), "transformer.wpe.weight": t("embed.pos.weight"),
           "transformer.ln_f.weight": t("final_ln.weight"), "transformer.ln_f.bias": t("final_ln.bias")}
    out["lm_head.weight"] = t("embed.tok.weight" if cfg.tie_embeddings else "lm_head.weight")
    for i in range(cfg.layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[theirs + b + ".weight"], out[theirs + b + ".bias"] = t(ours + a + ".weight"), t(ours + a + ".bias")
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[theirs + b + ".weight"] = t(ours + a + ".weight").t()  # Conv1D: [in, out]
            out[theirs + b + ".bias"] = t(ours + a + ".bias")
    return config, out


def _gpt_neox(cfg: ModelConfig, t) -> tuple[dict, dict]:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
    config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "intermediate_size": cfg.ffn, "hidden_act": cfg.activation, "max_position_embeddings": cfg.seq_len,
              "layer_norm_eps": cfg.eps, "initializer_range": cfg.init_std, "use_parallel_residual": False,
              "attention_bias": True, "hidden_dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
              # transformers >= 5 reads rope_parameters; earlier releases rotary_pct / rotary_emb_base.
              "rope_parameters": rope, "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_theta}
    out = {"gpt_neox.embed_in.weight": t("embed.tok.weight"),
           "gpt_neox.final_layer_norm.weight": t("final_ln.weight"),
           "gpt_neox.final_layer_norm.bias": t("final_ln.bias"),
           "embed_out.weight": t("embed.tok.weight" if cfg.tie_embeddings else "lm_head.weight")}
    hd, heads = cfg.head_dim, cfg.heads
    for i in range(cfg.layers):
        ours, theirs = f"layers.{i}.", f"gpt_neox.layers.{i}."
        # Our packed rows [3, heads, head_dim] -> NeoX's [heads, 3, head_dim].
        qkv_w, qkv_b = t(ours + "attn.qkv.weight"), t(ours + "attn.qkv.bias")
        out[theirs + "attention.query_key_value.weight"] = \
            qkv_w.view(3, heads, hd, -1).transpose(0, 1).reshape(3 * heads * hd, -1)
        out[theirs + "attention.query_key_value.bias"] = qkv_b.view(3, heads, hd).transpose(0, 1).reshape(-1)
        for a, b in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"), ("attn.proj", "attention.dense"),
                     ("mlp.fc1", "mlp.dense_h_to_4h"), ("mlp.fc2", "mlp.dense_4h_to_h")):
            out[theirs + b + ".weight"], out[theirs + b + ".bias"] = t(ours + a + ".weight"), t(ours + a + ".bias")
    return config, out


def _bert(cfg: ModelConfig, t) -> tuple[dict, dict]:
    config = {"model_type": "bert", "architectures": ["BertForPreTraining"], "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "intermediate_size": cfg.ffn, "hidden_act": cfg.activation, "max_position_embeddings": cfg.seq_len,
              "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.eps, "initializer_range": cfg.init_std,
              "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
              "tie_word_embeddings": True, "pad_token_id": None}
    emb = "bert.embeddings."
    out = {emb + "word_embeddings.weight": t("embed.tok.weight"),
           emb + "position_embeddings.weight": t("embed.pos.weight"),
           emb + "token_type_embeddings.weight": t("embed.token_type.weight"),
           emb + "LayerNorm.weight": t("embed.ln.weight"), emb + "LayerNorm.bias": t("embed.ln.bias"),
           "bert.pooler.dense.weight": t("pooler.dense.weight"), "bert.pooler.dense.bias": t("pooler.dense.bias"),
           "cls.predictions.bias": t("mlm.bias"), "cls.predictions.decoder.bias": t("mlm.bias"),
           "cls.predictions.decoder.weight": t("embed.tok.weight"),
           "cls.predictions.transform.dense.weight": t("mlm.dense.weight"),
           "cls.predictions.transform.dense.bias": t("mlm.dense.bias"),
           "cls.predictions.transform.LayerNorm.weight": t("mlm.ln.weight"),
           "cls.predictions.transform.LayerNorm.bias": t("mlm.ln.bias"),
           "cls.seq_relationship.weight": t("nsp.weight"), "cls.seq_relationship.bias": t("nsp.bias")}
    inner = cfg.heads * cfg.head_dim
    for i in range(cfg.layers):
        ours, theirs = f"layers.{i}.", f"bert.encoder.layer.{i}."
        qkv_w, qkv_b = t(ours + "attn.qkv.weight"), t(ours + "attn.qkv.bias")
        for k, part in enumerate(("query", "key", "value")):  # packed rows [3, heads, head_dim]
            out[f"{theirs}attention.self.{part}.weight"] = qkv_w[k * inner:(k + 1) * inner]
            out[f"{theirs}attention.self.{part}.bias"] = qkv_b[k * inner:(k + 1) * inner]
        for a, b in (("attn.proj", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"), ("ln2", "output.LayerNorm")):
            out[theirs + b + ".weight"], out[theirs + b + ".bias"] = t(ours + a + ".weight"), t(ours + a + ".bias")
    return config, out


def export_checkpoint(source: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face model of ``source`` (a checkpoint or run directory) to ``out_dir``."""
    ckpt = resolve_checkpoint(source)
    cfg = ModelConfig(**ckpt.state["model_config"])
    _check_exportable(ckpt, cfg)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty (choose a new directory)")

    def tensor(name: str) -> torch.Tensor:
        return ckpt.model[name].to(dtype)

    if cfg.arch == "gpt":
        config, weights = (_gpt_neox if cfg.position_embedding == "rope" else _gpt2)(cfg, tensor)
    else:
        config, weights = _bert(cfg, tensor)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    # One contiguous copy each: transposes are views, Q/K/V slice one tensor and the tied
    # embedding appears twice, and safetensors refuses tensors that share storage.
    weights = {k: v.clone(memory_format=torch.contiguous_format) for k, v in weights.items()}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(weights, tmp / "pytorch_model.bin")
    else:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    os.replace(tmp, out_dir)
    return out_dir
