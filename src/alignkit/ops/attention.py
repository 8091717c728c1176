"""Which scaled-dot-product-attention kernels alignkit's forward passes use on a GPU.

PyTorch's `scaled_dot_product_attention` picks among flash, memory-efficient, cuDNN and math
kernels; on Hopper GPUs (H100 / H200) it picks cuDNN where it can. cuDNN's attention builds an
execution graph for every new input shape, and post-training changes shapes all the time: each
padded batch has its own length, and a rollout's key/value length grows by one at every decoded
token. Measured on one NVIDIA H200 (torch 2.11.0+cu130, transformers 5.17, a 494M-parameter
Llama-shaped model, bench/gpu_check.sh with torch.profiler): cuDNN attention took 1.85 ms of CPU
per call while decoding (58% of the rollout's CPU time, 8% of its GPU time) and 14.5 ms of CPU per
backward call in SFT (64% of the step's CPU time), so both ran CPU-bound. The flash and
memory-efficient kernels need no per-shape graph.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["post_training_sdpa"]


def post_training_sdpa(device: torch.device | str):
    """A context for forward (and their backward) passes on `device`: on CUDA, SDPA may use the
    flash, memory-efficient and math kernels but not cuDNN's (see the module docstring); on any
    other device, nothing changes. Nests with other `torch.nn.attention.sdpa_kernel` contexts;
    the previous kernel settings come back on exit. Raises nothing."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
