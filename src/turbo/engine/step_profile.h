// TURBO_PROFILE step timing, shared by the engine's construction (engine.cc) and its step (step.cc).
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace turbo {

// TURBO_PROFILE=1: every 32 steps, the mean wall time of a step and how many of them were pipelined.
// TURBO_PROFILE=steps: one line per step (its rows, its new tokens, whether it was chained, its wall time).
struct StepProfile {
  const char* mode = std::getenv("TURBO_PROFILE");
  bool on = mode != nullptr;
  bool each = on && std::strcmp(mode, "steps") == 0;
  double total = 0;
  int n = 0, pipelined = 0;
  long step = 0;
  void add(std::chrono::steady_clock::time_point t0, bool chained, size_t batch, long tokens) {
    if (!on) return;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (each) {
      std::fprintf(stderr, "[turbo] step %ld rows %zu tokens %ld %s %.3f ms\n", step++, batch, tokens,
                   chained ? "chained" : "launched", 1e3 * dt);
      return;
    }
    total += dt;
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
