"""JIT build of the turbo CUDA kernels (src/turbo/kernels/cuda) as a throwaway extension, for the GPU tests and
the kernel benchmarks, until the real `lmkit._turbo` build exposes them.

    ops = cuda_harness.load()          # builds once per source change, cached under /tmp/turbo_cuda_build
    ops.rms_norm(out, x, weight, eps)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNEL_DIR = REPO / "src" / "turbo" / "kernels" / "cuda"
SOURCES = [
    "paged_attention.cu",
    "prefill_attention.cu",
    "norm.cu",
    "rotary.cu",
    "activation.cu",
    "kv_write.cu",
    "sampling.cu",
    "gemv.cu",
]
BUILD_DIR = Path(os.environ.get("TURBO_CUDA_BUILD_DIR", "/tmp/turbo_cuda_build"))

GLUE = r"""
#include <torch/extension.h>

#include "turbo/kernels/cuda/cuda_kernels.h"

namespace tc = turbo::cuda;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("decode_workspace_size", &tc::decode_workspace_size);
    m.def("decode_num_splits", &tc::decode_num_splits);
    m.def("decode_min_split_tokens", &tc::decode_min_split_tokens);
    m.def("paged_attention_decode",
          [](at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
             at::Tensor context_lens, double scale, int64_t num_splits, at::Tensor workspace, int64_t window,
             std::optional<at::Tensor> min_split_tokens) {
              tc::paged_attention_decode(out, q, k_cache, v_cache, block_tables, context_lens, scale, num_splits,
                                         workspace, window, min_split_tokens.value_or(at::Tensor()));
          },
          py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
          py::arg("context_lens"), py::arg("scale"), py::arg("num_splits"), py::arg("workspace"),
          py::arg("window") = 0, py::arg("min_split_tokens") = py::none());
    m.def("paged_attention_prefill",
          [](at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
             at::Tensor cu_seqlens_q, at::Tensor context_lens, int64_t max_query_len, double scale, int64_t window) {
              tc::paged_attention_prefill(out, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                          max_query_len, scale, window);
          },
          py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
          py::arg("cu_seqlens_q"), py::arg("context_lens"), py::arg("max_query_len"), py::arg("scale"),
          py::arg("window") = 0);
    m.def("write_kv", [](at::Tensor k, at::Tensor v, at::Tensor kc, at::Tensor vc, at::Tensor slots) {
        tc::write_kv(k, v, kc, vc, slots);
    });
    m.def("rms_norm", [](at::Tensor out, at::Tensor x, at::Tensor w, double eps) { tc::rms_norm(out, x, w, eps); });
    m.def("fused_add_rms_norm",
          [](at::Tensor x, at::Tensor r, at::Tensor w, double eps) { tc::fused_add_rms_norm(x, r, w, eps); });
    m.def("rotary", [](at::Tensor q, at::Tensor k, at::Tensor pos, at::Tensor cs) { tc::rotary(q, k, pos, cs); });
    m.def("rotary_write_kv", [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor pos, at::Tensor cs,
                                at::Tensor kc, at::Tensor vc, at::Tensor slots) {
        tc::rotary_write_kv(q, k, v, pos, cs, kc, vc, slots);
    });
    m.def("silu_mul", [](at::Tensor out, at::Tensor gu) { tc::silu_mul(out, gu); });
    m.def("sample",
          [](at::Tensor logits, at::Tensor t, at::Tensor k, at::Tensor p, at::Tensor mp, at::Tensor seeds,
             at::Tensor steps, at::Tensor out) { tc::sample(logits, t, k, p, mp, seeds, steps, out); });
    m.def("apply_penalties", [](at::Tensor logits, at::Tensor counts, at::Tensor rep, at::Tensor freq,
                                at::Tensor pres) { tc::apply_penalties(logits, counts, rep, freq, pres); });
    m.def("repetition_penalty",
          [](at::Tensor logits, at::Tensor ids, at::Tensor pen) { tc::repetition_penalty(logits, ids, pen); });
    m.def("logprobs", &tc::logprobs);
    m.def("gemv", [](at::Tensor y, at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias) {
        tc::gemv(y, x, w, bias.value_or(at::Tensor()));
    });
    m.def("gemv_supported", &tc::gemv_supported);
}
"""

_MODULE = None


def load(verbose: bool = False):
    """Build (or reuse) the extension and return the module."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    import torch
    from torch.utils.cpp_extension import load as jit_load

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    glue = BUILD_DIR / "turbo_cuda_glue.cpp"
    if not glue.exists() or glue.read_text() != GLUE:
        glue.write_text(GLUE)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(min(16, os.cpu_count() or 4)))
    # TURBO_CUDA_EXTRA_CFLAGS (e.g. "-DTURBO_DECODE_CHUNK=8") builds a variant in its own folder, for experiments.
    extra = os.environ.get("TURBO_CUDA_EXTRA_CFLAGS", "").split()
    build_dir, name = BUILD_DIR, "turbo_cuda_kernels_test"
    if extra:
        import hashlib

        tag = hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8]
        build_dir, name = BUILD_DIR.with_name(f"{BUILD_DIR.name}_{tag}"), f"{name}_{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / glue.name).write_text(GLUE)
        glue = build_dir / glue.name
    _MODULE = jit_load(
        name=name,
        sources=[str(glue)] + [str(KERNEL_DIR / s) for s in SOURCES],
        extra_include_paths=[str(REPO / "src")],
        extra_cflags=["-O2", "-std=c++17"],
        # no --use_fast_math: fp32 results must stay close to PyTorch's
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", "-diag-suppress=3306"] + extra,
        build_directory=str(build_dir),
        verbose=verbose,
    )
    return _MODULE
