"""vLLM in its own process (`alignkit vllm-serve`), and the training side's engine that talks to it.

Server mode keeps the sampler off the training processes: `alignkit vllm-serve model=... port=...`
starts one vLLM engine (in the server process) behind a small HTTP interface on `host:port`, and
each training process samples through a `VLLMServerEngine`, which has `RolloutEngine`'s
interface. Requests (JSON over HTTP, one at a time: the engine is not shared between threads):

    GET  /health                       -> {"ok": true, "model": ...}
    POST /generate {prompts, params, stop_token_ids}
                                       -> {"samples": [{prompt_index, completion_ids, logprobs,
                                           finish_reason}], "stats": {...}}
    POST /reload   {dir: ...}          -> {"ok": true}     load a folder of safetensors files into the
                                                           engine (vLLM's own loader reads them, so
                                                           each tensor-parallel worker takes its part)
    POST /shutdown                     -> {"ok": true}     the server exits after answering

Weights travel through a folder both sides can read (`vllm.sync_dir`, by default inside the run
folder): the trainer writes the changed tensors as safetensors files, one per bucket (see
`weight_sync`), asks the server to reload from that folder (vLLM's in-place reload, which leaves
layers without a file as they were), then deletes it. Token ids go in and out;
alignkit's tokenizer decodes on the training side, so nothing is re-tokenised.

Every request has a timeout (`vllm.timeout` seconds); a server that does not answer, or cannot be
reached, ends the run with one line (UserError), never a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from alignkit.errors import UserError
from alignkit.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams
from alignkit.rollout.weight_sync import changed_buckets, check_syncable

__all__ = ["VLLMServerEngine", "serve", "request"]


def _buckets_in_fp32(model, synced: dict, bucket_bytes: int, full: bool):
    """`changed_buckets` with autocast off (merged LoRA weights computed in float32)."""
    import torch

    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield from changed_buckets(model, synced, bucket_bytes, full=full)


def request(url: str, payload: dict | None, timeout: float) -> dict:
    """POST `payload` as JSON to `url` (GET when None) and return the JSON answer. Raises
    UserError (one line) when the server cannot be reached, does not answer within `timeout`
    seconds, or answers with an error."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read().decode()).get("error", str(e))
        except Exception:
            msg = str(e)
        raise UserError(f"vLLM server {url}: {msg}") from None
    except (socket.timeout, TimeoutError):
        raise UserError(f"vLLM server {url} did not answer within {timeout:g} s; check the server's log, or raise "
                        "vllm.timeout") from None
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"vLLM server {url} is not reachable ({reason}); start it with `alignkit vllm-serve "
                        "model=... port=...` or fix vllm.host / vllm.port") from None


class VLLMServerEngine(RolloutEngine):
    """`RolloutEngine`'s interface over an `alignkit vllm-serve` server at http://host:port.

    sync_dir: a folder the server can read, where weight buckets are written (created; emptied
    after each sync). timeout: seconds per request. Construction checks the server answers
    (UserError otherwise)."""

    def __init__(self, tokenizer, host: str, port: int, sync_dir: str, *, timeout: float = 300.0,
                 bucket_mb: float = 256, stop_token_ids: set[int] | None = None):
        super().__init__(tokenizer, stop_token_ids)
        self.url = f"http://{host}:{port}"
        self.timeout = timeout
        self.sync_dir = Path(sync_dir)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._synced: dict[str, tuple] = {}
        self._n = 0
        self.last_sync: dict = {}
        self.info = request(self.url + "/health", None, min(timeout, 30.0))

    def sync_weights(self, model, full: bool = False) -> dict:
        """Write the changed weights of `model` as safetensors buckets under sync_dir and have the
        server load them (see `VLLMEngine.sync_weights` for what is sent). With several processes
        every rank gathers (FSDP), rank 0 alone writes and asks the server, and all wait for it
        (a barrier): every process must call this at the same point."""
        from safetensors.torch import save_file

        import torch.distributed as dist

        check_syncable(model)
        writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        t0 = time.perf_counter()
        n = size = 0
        files = 0
        folder = self.sync_dir / f"sync-{os.getpid()}-{self._n}"
        self._n += 1
        try:
            for k, bucket in enumerate(_buckets_in_fp32(model, self._synced, self.bucket_bytes, full)):
                n += len(bucket)
                size += sum(t.numel() * t.element_size() for _, t in bucket)
                if writer:
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"bucket-{k:05d}.safetensors"
                    save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in bucket}, str(path))
                    files += 1
            if files:
                request(self.url + "/reload", {"dir": str(folder.resolve())}, self.timeout)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not writer or (dist.is_available() and dist.is_initialized()):
            dist.barrier()  # no process samples before rank 0's reload has finished
        self.last_sync = {"tensors": n, "bytes": size, "buckets": files, "seconds": time.perf_counter() - t0}
        return self.last_sync

    def generate(self, model, prompts: list, params: SamplingParams) -> RolloutBatch:
        """As `VLLMEngine.generate`, through the server."""
        if model is not None:
            self.sync_weights(model)
        ids = self.encode(prompts)
        ans = request(self.url + "/generate", {"prompts": ids, "params": {**asdict(params), "stop": list(params.stop)},
                                               "stop_token_ids": sorted(self.stop_ids)}, self.timeout)
        samples = [self._finish(s["prompt_index"], ids[s["prompt_index"]], s["completion_ids"], s["logprobs"],
                                s["finish_reason"], params) for s in ans["samples"]]
        return RolloutBatch(samples, params.n, ans.get("stats", {}))

    def shutdown(self) -> None:
        """Ask the server to exit (it answers first)."""
        request(self.url + "/shutdown", {}, min(self.timeout, 30.0))


def serve(model: str, host: str = "127.0.0.1", port: int = 8765, *, dtype: str = "auto", seed: int = 0,
          max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, kv_cache_gb: float = 1.0,
          tensor_parallel_size: int = 1, ready_file: str | None = None) -> None:
    """Run a vLLM engine for `model` behind the HTTP interface of the module docstring until a
    /shutdown request. `ready_file`: written with the address once the server listens (for
    scripts and tests). Raises UserError for what `VLLMEngine` refuses, or a port in use."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from transformers import AutoTokenizer

    from alignkit.rollout.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(model)
    engine = VLLMEngine(tok, model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                        gpu_memory_utilization=gpu_memory_utilization, kv_cache_gb=kv_cache_gb,
                        tensor_parallel_size=tensor_parallel_size)
    default_stop = set(engine.stop_ids)
    state = {"stop": False}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet: one line per request would drown the engine's own log
            pass

        def _answer(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._answer(200, {"ok": True, "model": model})
            else:
                self._answer(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):
            try:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/generate":
                    self._answer(200, _generate(engine, payload, default_stop))
                elif self.path == "/reload":
                    self._answer(200, _reload(engine, payload["dir"]))
                elif self.path == "/shutdown":
                    state["stop"] = True
                    self._answer(200, {"ok": True})
                else:
                    self._answer(404, {"error": f"no such endpoint {self.path}"})
            except Exception as e:  # the client gets one line; the server keeps serving
                self._answer(500, {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"})

    try:
        httpd = HTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"vllm-serve: cannot listen on {host}:{port} ({e.strerror}); pick another port") from None
    print(f"vllm-serve: {model} on http://{host}:{port} (engine start {engine.start_seconds:.1f} s)", flush=True)
    if ready_file:
        Path(ready_file).write_text(f"http://{host}:{port}\n")
    try:
        while not state["stop"]:
            httpd.handle_request()
    finally:
        httpd.server_close()
    print("vllm-serve: shut down", flush=True)


def _generate(engine, payload: dict, default_stop: set[int]) -> dict:
    p = payload["params"]
    params = SamplingParams(**{**p, "stop": tuple(p.get("stop", ()))})
    engine.stop_ids = set(payload.get("stop_token_ids") or default_stop)
    batch = engine.generate(None, payload["prompts"], params)
    return {"samples": [{"prompt_index": s.prompt_index, "completion_ids": s.completion_ids, "logprobs": s.logprobs,
                         "finish_reason": s.finish_reason} for s in batch.samples], "stats": batch.stats}


def _reload(engine, folder: str) -> dict:
    from alignkit.rollout.vllm_engine import _quiet_reload

    with _quiet_reload():
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder, "is_checkpoint_format": True})
    engine.after_reload()
    return {"ok": True}
