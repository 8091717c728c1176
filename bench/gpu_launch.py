"""What one CUDA launch and one eager decoder forward cost on this machine, beside the same
forward replayed as a CUDA graph: tells launch-bound from compute-bound at a benchmark's shape.

    python bench/gpu_launch.py --hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --vocab 151936
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, batch=64).items():
        p.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    a = p.parse_args()
    dev = torch.device("cuda")
    x = torch.zeros(16, device=dev)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(2000):
        x.add_(1)
    torch.cuda.synchronize()
    print(f"one tiny kernel, launched back to back: {1e6 * (time.perf_counter() - t) / 2000:.1f} us")
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, a.vocab, (a.batch, 1), device=dev)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        eager = (time.perf_counter() - t) / 20
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(input_ids=ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(input_ids=ids, use_cache=False)
        g.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()
        graph = (time.perf_counter() - t) / 20
    print(f"decoder forward, batch {a.batch} x 1 token, bf16: eager {1e3 * eager:.2f} ms, "
          f"CUDA graph replay {1e3 * graph:.2f} ms ({eager / graph:.1f}x)")


if __name__ == "__main__":
    main()
