"""GPT and BERT with MSG masks."""
from megatron_msg.config import ModelConfig


def build_model(cfg: ModelConfig):
    """The model class for ``cfg.arch`` at ``cfg``'s shape."""
    if cfg.arch == "gpt":
        from megatron_msg.model.gpt import GPT
        return GPT(cfg)
    if cfg.arch == "bert":
        from megatron_msg.model.bert import BERT
        return BERT(cfg)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}")
