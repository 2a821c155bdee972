"""megatron_msg: Megatron-style pre-training with Masked Structural Growth."""
__version__ = "0.1.0"
