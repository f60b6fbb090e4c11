// lmkit._turbo: the Python face of the turbo engine (the only file that sees Python).
// The engine's loop thread never takes the GIL; get_outputs and shutdown release it while they wait.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <c10/core/InferenceMode.h>
#include <torch/python.h>

#include "turbo/engine/engine.h"
#include "turbo/kernels/kernels.h"
#include "turbo/kv/block_manager.h"
#ifdef TURBO_WITH_CUDA
#include "turbo/engine/decode_graphs.h"
#endif

namespace py = pybind11;
using namespace turbo;

namespace {

SamplingParams params_from(const py::dict& d) {
  SamplingParams p;
  auto get = [&](const char* k) -> py::object { return d.contains(k) ? py::object(d[k]) : py::object(py::none()); };
  if (!get("max_new_tokens").is_none()) p.max_new_tokens = get("max_new_tokens").cast<int>();
  if (!get("temperature").is_none()) p.temperature = get("temperature").cast<float>();
  if (!get("top_p").is_none()) p.top_p = get("top_p").cast<float>();
  if (!get("top_k").is_none()) p.top_k = get("top_k").cast<int>();
  if (!get("min_p").is_none()) p.min_p = get("min_p").cast<float>();
  if (!get("repetition_penalty").is_none()) p.repetition_penalty = get("repetition_penalty").cast<float>();
  if (!get("seed").is_none()) {
    p.has_seed = true;
    p.seed = static_cast<uint64_t>(get("seed").cast<py::int_>().attr("__and__")(py::int_(~0ULL)).cast<uint64_t>());
  }
  if (!get("stop_token_ids").is_none()) p.stop_token_ids = get("stop_token_ids").cast<std::vector<int32_t>>();
  if (!get("ignore_eos").is_none()) p.ignore_eos = get("ignore_eos").cast<bool>();
  if (!get("logprobs").is_none()) p.logprobs = get("logprobs").cast<int>();
  return p;
}

py::object logprob_to_py(const TokenLogprob& lp) {
  py::list top;
  for (auto& [t, v] : lp.top) top.append(py::make_tuple(t, v));
  return py::make_tuple(lp.token_id, lp.logprob, top);
}

// The longest q_len of a batch (test bindings only: reads cu_q_lens, syncing if it is on a GPU).
int64_t max_query_len(const at::Tensor& cu_q_lens) {
  if (cu_q_lens.numel() < 2) return 1;
  return std::max<int64_t>(1, (cu_q_lens.slice(0, 1) - cu_q_lens.slice(0, 0, -1)).max().item<int64_t>());
}

// Leading sequences of a batch with one query row (test bindings only: reads cu_q_lens, syncing on a GPU).
int64_t num_decodes(const at::Tensor& cu_q_lens) {
  const at::Tensor lens = (cu_q_lens.slice(0, 1) - cu_q_lens.slice(0, 0, -1)).cpu();
  int64_t n = 0;
  while (n < lens.numel() && lens[n].item<int64_t>() == 1) ++n;
  return n;
}

#ifdef TURBO_WITH_CUDA
constexpr bool TURBO_CUDA_BUILT = true;
#else
constexpr bool TURBO_CUDA_BUILT = false;
#endif

}  // namespace

PYBIND11_MODULE(_turbo, m) {
  m.doc() = "turbo: the C++ engine of lmkit (CPU kernels; CUDA kernels when built with them)";
  m.def("cuda_built", [] { return TURBO_CUDA_BUILT; },
        "Whether this build has the CUDA kernels (TurboEngine.supports asks it).");
#ifdef TURBO_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif

  // ---- engine ----
  py::class_<EngineConfig>(m, "EngineConfig")
      .def(py::init<>())
      .def_readwrite("max_num_seqs", &EngineConfig::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &EngineConfig::max_num_batched_tokens)
      .def_readwrite("num_blocks", &EngineConfig::num_blocks)
      .def_readwrite("block_size", &EngineConfig::block_size)
      .def_readwrite("enable_prefix_caching", &EngineConfig::enable_prefix_caching)
      .def_readwrite("session_len", &EngineConfig::session_len)
      .def_readwrite("num_threads", &EngineConfig::num_threads)
      .def_readwrite("quant_policy", &EngineConfig::quant_policy)
      .def_readwrite("cuda_graphs", &EngineConfig::cuda_graphs);

  py::class_<ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_layers", &ModelConfig::num_layers)
      .def_readwrite("num_heads", &ModelConfig::num_heads)
      .def_readwrite("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("qkv_bias", &ModelConfig::qkv_bias)
      .def_readwrite("qk_norm", &ModelConfig::qk_norm)
      .def_readwrite("sliding_window", &ModelConfig::sliding_window);

  py::class_<Output>(m, "Output")
      .def_readonly("request_id", &Output::request_id)
      .def_readonly("new_token_ids", &Output::new_token_ids)
      .def_property_readonly("logprobs",
                             [](const Output& o) -> py::object {
                               if (!o.has_logprobs) return py::none();
                               py::list l;
                               for (auto& lp : o.logprobs) l.append(logprob_to_py(lp));
                               return l;
                             })
      .def_property_readonly("finish_reason", [](const Output& o) { return static_cast<int>(o.finish_reason); })
      .def_readonly("error", &Output::error)
      .def_readonly("num_prompt_tokens", &Output::num_prompt_tokens)
      .def_readonly("num_cached_tokens", &Output::num_cached_tokens);

  py::class_<EngineStats>(m, "EngineStats")
      .def_readonly("num_running", &EngineStats::num_running)
      .def_readonly("num_waiting", &EngineStats::num_waiting)
      .def_readonly("num_blocks_total", &EngineStats::num_blocks_total)
      .def_readonly("num_blocks_free", &EngineStats::num_blocks_free)
      .def_readonly("num_blocks_cached", &EngineStats::num_blocks_cached)
      .def_readonly("num_prefill_tokens", &EngineStats::num_prefill_tokens)
      .def_readonly("num_generated_tokens", &EngineStats::num_generated_tokens)
      .def_readonly("num_steps", &EngineStats::num_steps)
      .def_readonly("num_preemptions", &EngineStats::num_preemptions)
      .def_readonly("num_pipelined_steps", &EngineStats::num_pipelined_steps)
      .def_readonly("num_cache_hit_blocks", &EngineStats::num_cache_hit_blocks);

  py::register_exception<std::invalid_argument>(m, "InvalidRequest", PyExc_ValueError);

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const EngineConfig& cfg, const ModelConfig& mcfg, const std::map<std::string, at::Tensor>& w) {
             WeightMap weights(w.begin(), w.end());
             return std::make_unique<Engine>(cfg, mcfg, weights);
           }),
           py::arg("config"), py::arg("model_config"), py::arg("weights"))
      .def("add_request",
           [](Engine& e, const std::string& id, std::vector<int32_t> prompt, const py::dict& sampling) {
             e.add_request(id, std::move(prompt), params_from(sampling));
           })
      .def("abort_request", &Engine::abort_request)
      .def("get_outputs", [](Engine& e, double timeout) { return e.get_outputs(timeout); },
           py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("stats", &Engine::stats)
      .def("shutdown", &Engine::shutdown, py::call_guard<py::gil_scoped_release>());

  // ---- the model alone, over its own KV cache (logit tests) ----
  struct ModelRunner {
    std::unique_ptr<LlamaModel> model;
    KVCache kv;
#ifdef TURBO_WITH_CUDA
    std::unique_ptr<cuda::DecodeGraphs> graphs;  // made by the first forward_graph
#endif
  };
  py::class_<ModelRunner>(m, "Model")
      .def(py::init([](const ModelConfig& mcfg, const std::map<std::string, at::Tensor>& w, int num_blocks,
                       int block_size) {
             auto r = std::make_unique<ModelRunner>();
             r->model = std::make_unique<LlamaModel>(mcfg, WeightMap(w.begin(), w.end()));
             r->kv = KVCache(mcfg.num_layers, num_blocks, block_size, mcfg.num_kv_heads, mcfg.head_dim,
                             r->model->options());
             return r;
           }),
           py::arg("model_config"), py::arg("weights"), py::arg("num_blocks"), py::arg("block_size"))
      .def("forward",
           [](ModelRunner& r, at::Tensor token_ids, at::Tensor positions, at::Tensor slot_mapping,
              at::Tensor block_tables, at::Tensor cu_q_lens, at::Tensor kv_lens, at::Tensor sample_rows) {
             c10::InferenceMode guard;
             ForwardBatch b{token_ids, positions, slot_mapping, block_tables, cu_q_lens, kv_lens, sample_rows};
             b.max_query_len = max_query_len(cu_q_lens);
             b.is_decode = b.max_query_len == 1;
             b.num_decodes = num_decodes(cu_q_lens);
             return r.model->forward(b, r.kv);
           },
           py::call_guard<py::gil_scoped_release>())
#ifdef TURBO_WITH_CUDA
      // A decode batch through a CUDA graph (buckets up to max_num_seqs, block tables up to max_blocks wide).
      .def("forward_graph",
           [](ModelRunner& r, at::Tensor token_ids, at::Tensor positions, at::Tensor slot_mapping,
              at::Tensor block_tables, at::Tensor cu_q_lens, at::Tensor kv_lens, at::Tensor sample_rows,
              int64_t max_num_seqs, int64_t max_blocks) {
             c10::InferenceMode guard;
             if (!r.graphs) r.graphs = std::make_unique<cuda::DecodeGraphs>(*r.model, r.kv, max_num_seqs, max_blocks);
             ForwardBatch b{token_ids, positions, slot_mapping, block_tables, cu_q_lens, kv_lens, sample_rows};
             b.max_query_len = max_query_len(cu_q_lens);
             b.is_decode = b.max_query_len == 1;
             b.num_decodes = num_decodes(cu_q_lens);
             TORCH_CHECK(r.graphs->accepts(b), "forward_graph: not a decode batch the graphs accept");
             return std::make_tuple(r.graphs->run(b).clone(), r.graphs->bucket(token_ids.size(0)),
                                    r.graphs->num_graphs());
           },
           py::call_guard<py::gil_scoped_release>())
#endif
      ;

  // ---- block manager (unit tests) ----
  m.def("hash_block", [](uint64_t parent, const std::vector<int64_t>& t) {
    std::vector<int32_t> u32(t.size());  // token ids as unsigned 32-bit (as lmkit/block_hash.py writes them)
    for (size_t i = 0; i < t.size(); ++i) u32[i] = static_cast<int32_t>(static_cast<uint32_t>(t[i] & 0xFFFFFFFF));
    return hash_block(parent, u32.data(), u32.size());
  });
  m.def("root_hash", &root_hash);
  py::class_<BlockTable>(m, "BlockTable")
      .def(py::init<>())
      .def_readonly("blocks", &BlockTable::blocks)
      .def_readonly("hashes", &BlockTable::hashes)
      .def_readwrite("root", &BlockTable::root);
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int, int, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true)
      .def_property_readonly("num_blocks_total", &BlockManager::num_blocks_total)
      .def_property_readonly("num_blocks_free", &BlockManager::num_blocks_free)
      .def_property_readonly("num_blocks_cached", &BlockManager::num_blocks_cached)
      .def_property_readonly("num_hits", &BlockManager::num_hits)
      .def("match_prefix", [](BlockManager& bm, const std::vector<int32_t>& t, BlockTable& tab) {
        return bm.match_prefix(t.data(), static_cast<int>(t.size()), tab);
      })
      .def("allocate", &BlockManager::allocate)
      .def("cache_full_blocks", [](BlockManager& bm, const std::vector<int32_t>& t, int64_t n, BlockTable& tab) {
        if (n > static_cast<int64_t>(t.size())) throw std::invalid_argument("num_computed > len(tokens)");
        bm.cache_full_blocks(t.data(), n, tab);
      })
      .def("free", &BlockManager::free)
      .def("ref_count", &BlockManager::ref_count)
      .def("has_hash", &BlockManager::has_hash)
      .def("block_hash", &BlockManager::block_hash)
      .def("free_order", &BlockManager::free_order)
      .def("check", &BlockManager::check);

  // ---- kernels (kernel tests) ----
  m.def("rms_norm", [](const at::Tensor& x, const at::Tensor& w, double eps) {
    at::Tensor out = at::empty_like(x);
    kernels::rms_norm(out, x, w, eps);
    return out;
  });
  m.def("rms_norm_", [](at::Tensor x, const at::Tensor& w, double eps) { kernels::rms_norm(x, x, w, eps); });
  m.def("fused_add_rms_norm", [](at::Tensor x, at::Tensor residual, const at::Tensor& w, double eps) {
    kernels::fused_add_rms_norm(x, residual, w, eps);
  });
  m.def("rotary", [](at::Tensor x, const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin) {
    kernels::rotary(x, pos, cos, sin);
  });
  m.def("silu_mul", &kernels::silu_mul);
  m.def("write_kv", [](const at::Tensor& k, const at::Tensor& v, at::Tensor kc, at::Tensor vc, const at::Tensor& s) {
    kernels::write_kv(k, v, kc, vc, s);
  });
  m.def("paged_attention",
        [](const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
           const at::Tensor& cu, const at::Tensor& kvl, double scale, int64_t window) {
          at::Tensor out = at::empty(q.sizes(), q.options());
          kernels::paged_attention(out, q, kc, vc, bt, cu, kvl, max_query_len(cu), scale, window);
          return out;
        },
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("cu_q_lens"),
        py::arg("kv_lens"), py::arg("scale"), py::arg("sliding_window") = 0);
  m.def("sample",
        [](const at::Tensor& logits, const std::vector<py::dict>& params, const std::vector<std::vector<int32_t>>& hist,
           const std::vector<int64_t>& steps) {
          const size_t n = params.size();
          if (hist.size() != n || steps.size() != n) throw std::invalid_argument("one params/history/step per row");
          std::vector<SamplingParams> ps;
          for (auto& d : params) ps.push_back(params_from(d));
          std::vector<kernels::SampleRow> rows(n);
          for (size_t i = 0; i < n; ++i)
            rows[i] = {&ps[i], hist[i].data(), static_cast<int64_t>(hist[i].size()), ps[i].seed, steps[i]};
          std::vector<int32_t> tokens;
          std::vector<TokenLogprob> lps;
          kernels::sample(logits, rows, tokens, lps);
          py::list out_lp;
          for (size_t i = 0; i < n; ++i) out_lp.append(ps[i].logprobs >= 0 ? logprob_to_py(lps[i]) : py::none());
          return py::make_tuple(tokens, out_lp);
        });
}
