// TURBO_PROFILE=1 step timing, shared by the engine's construction (engine.cc) and its step (step.cc).
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace turbo {

// TURBO_PROFILE=1: every 32 steps, the mean wall time of a step and how many of them were pipelined.
struct StepProfile {
  bool on = std::getenv("TURBO_PROFILE") != nullptr;
  double total = 0;
  int n = 0, pipelined = 0;
  void add(std::chrono::steady_clock::time_point t0, bool chained, size_t batch) {
    if (!on) return;
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pipelined += chained;
    if (++n == 32) {
      std::fprintf(stderr, "[turbo] per step: %.2f ms, %d of 32 pipelined (batch %zu)\n", 1e3 * total / n, pipelined,
                   batch);
      total = 0;
      n = pipelined = 0;
    }
  }
};

}  // namespace turbo
