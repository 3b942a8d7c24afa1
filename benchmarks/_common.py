"""Helpers shared by the benchmark scripts: machine description, synthetic caches, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 1e6, 1)
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def write_synthetic_cache(path: str, n: int, d: int, *, sets=("cls",), seed: int = 0, chunk: int = 65536) -> str:
    """A complete float16 cache shard of ``n`` rows: two Gaussian classes, ``d``-dim features."""
    from cache import ShardWriter, fingerprint_of

    prov = {"format_version": 1, "backbone": {"library": "synthetic", "weights_sha256": "0" * 64},
            "preprocessing": {"preset": "none"}, "feature_dtype": "float16", "feature_sets": list(sets)}
    rng = np.random.default_rng(seed)
    center = rng.normal(size=d).astype(np.float32) * 0.1
    w = ShardWriter(path, feature_dims={s: d for s in sets}, provenance=prov, fingerprint=fingerprint_of(prov),
                    plan={"plan_id": "b" * 64, "input_start": 0, "input_stop": n, "num_inputs": n})
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        y = rng.integers(0, 2, m)
        x = (rng.standard_normal((m, d), dtype=np.float32) + np.where(y[:, None] == 1, center, -center))
        w.add_rows(features={s: x for s in sets}, labels=y, paths=[""] * m, sha256=["0" * 64] * m,
                   source=["s"] * m, group=[str(a + i) for i in range(m)], index=np.arange(a, a + m))
    w.finish()
    return path


def save_result(name: str, result: dict) -> str:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), **result}
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    return out


def capture_cuda_graph(f, x, stream, warmup: int = 3):
    """``f(x)`` captured once as a CUDA graph on ``stream`` (after ``warmup`` calls there,
    so compiled code and library handles are ready); replay it with ``graph.replay()``."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(warmup):
            f(x)
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            f(x)
    torch.cuda.synchronize()
    return graph
