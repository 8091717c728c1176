"""Memory-lean kernels in plain PyTorch (see `alignkit.ops.logprobs`)."""

from alignkit.ops.logprobs import (
    causal_lm_token_logps,
    chunked_token_logps,
    selective_log_softmax,
    shift_targets,
    split_causal_lm,
)

__all__ = [
    "causal_lm_token_logps",
    "chunked_token_logps",
    "selective_log_softmax",
    "shift_targets",
    "split_causal_lm",
]
