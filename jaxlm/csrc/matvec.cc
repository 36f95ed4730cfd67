// y = x W for a few rows x on the CPU, the columns of W split over threads.
//
// XLA:CPU runs a [1, K] x [K, N] dot on one thread. When W does not fit in the cache (the
// RHN's ten [830, 1660] kernels are 55 MB a token at batch 1) that product is bound by the
// memory bandwidth one core draws, and more cores streaming parts of W draw more. XLA's
// intra-op pool woke its threads too slowly for products of a few hundred microseconds, so
// this keeps its own team of threads, which spin for 0.5 ms after a product and then sleep.
// The team is made at the first call with `max_threads` threads, the calling thread
// included; later calls use at most that many. Each output column is summed over k in order
// by one thread, and the library is built with -ffp-contract=off (no fused multiply-adds in
// some loops and not others), so the result does not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kAlign = 16;            // floats in a 64-byte cache line
constexpr int64_t kMinColumns = 4 * kAlign;  // no thread gets fewer columns than this
constexpr auto kSpin = std::chrono::microseconds(500);  // a worker's spin before it sleeps

// y[m, c] = sum_k x[m, k] w[k, c] for c in [c0, c1): eight rows of w at a time (an eighth of
// the loads and stores of y), each column summed in the order of k.
void Columns(const float* __restrict x, const float* __restrict w, float* __restrict y,
             int64_t rows, int64_t k_size, int64_t n_size, int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * k_size;
    float* __restrict out = y + m * n_size;
    for (int64_t c = c0; c < c1; ++c) out[c] = 0.0f;
    int64_t k = 0;
    for (; k + 8 <= k_size; k += 8) {
      const float* xk = xm + k;
      const float* __restrict w0 = w + k * n_size;
      const float* __restrict w1 = w0 + n_size;
      const float* __restrict w2 = w1 + n_size;
      const float* __restrict w3 = w2 + n_size;
      const float* __restrict w4 = w3 + n_size;
      const float* __restrict w5 = w4 + n_size;
      const float* __restrict w6 = w5 + n_size;
      const float* __restrict w7 = w6 + n_size;
      for (int64_t c = c0; c < c1; ++c) {
        float sum = out[c];
        sum += xk[0] * w0[c];
        sum += xk[1] * w1[c];
        sum += xk[2] * w2[c];
        sum += xk[3] * w3[c];
        sum += xk[4] * w4[c];
        sum += xk[5] * w5[c];
        sum += xk[6] * w6[c];
        sum += xk[7] * w7[c];
        out[c] = sum;
      }
    }
    for (; k < k_size; ++k) {
      const float xk = xm[k];
      const float* __restrict wk = w + k * n_size;
      for (int64_t c = c0; c < c1; ++c) out[c] += xk * wk[c];
    }
  }
}

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Each Run, the caller and the size - 1 workers share out `blocks` calls of a task: each takes
// the next block not yet taken (an atomic counter), so a worker that wakes late or is
// descheduled holds up only the blocks it took. Run returns when every worker has finished.
class Team {
 public:
  // Starts size - 1 threads, fewer if the system refuses more.
  explicit Team(int size) : pid_(getpid()) {
    for (int i = 1; i < size; ++i) {
      try {
        threads_.emplace_back([this] { Work(); });
      } catch (const std::system_error&) {
        break;
      }
    }
  }
  ~Team() {
    stop_.store(true);
    generation_.fetch_add(1);
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()) + 1; }
  pid_t pid() const { return pid_; }

  // One caller at a time (see `busy`).
  void Run(int64_t blocks, const std::function<void(int64_t)>& task) {
    task_ = &task;  // published to the workers by the increment of generation_
    blocks_ = blocks;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(size() - 1);
    generation_.fetch_add(1);  // seq_cst: a worker going to sleep sees it, or we see it
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    Share();
    while (pending_.load(std::memory_order_acquire) != 0) Pause();
  }

  std::mutex busy;  // held by the caller of Run

 private:
  void Share() {
    for (int64_t b; (b = next_.fetch_add(1, std::memory_order_relaxed)) < blocks_;) (*task_)(b);
  }

  void Work() {
    uint64_t seen = 0;
    while (true) {
      const auto start = std::chrono::steady_clock::now();
      int64_t spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        Pause();
        if (++spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      if (stop_.load()) return;
      Share();
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  const pid_t pid_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t blocks_ = 0;
};

// The process's team, made at the size the first call asks for (later calls use at most that
// many threads), and made again in a child after fork(), which has none of the parent's
// threads. Never destroyed: its threads would be joined during static destruction, after XLA
// may have gone.
Team* GetTeam(int64_t size) {
  static std::atomic<Team*> team{nullptr};
  Team* current = team.load(std::memory_order_acquire);
  if (current != nullptr && current->pid() == getpid()) return current;
  Team* fresh = new Team(static_cast<int>(std::max<int64_t>(1, size)));
  if (team.compare_exchange_strong(current, fresh)) return fresh;  // the old one is leaked
  delete fresh;  // another thread made one first
  return current;
}

ffi::Error MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, int64_t max_threads) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  const auto y_dims = y->dimensions();
  if (w_dims.size() != 2 || x_dims.size() < 1 || x_dims.back() != w_dims[0]) {
    return ffi::Error::InvalidArgument("jaxlm_matvec: expected x [..., K] and W [K, N]");
  }
  bool y_ok = y_dims.size() == x_dims.size() && y_dims.back() == w_dims[1];
  for (size_t i = 0; y_ok && i + 1 < x_dims.size(); ++i) y_ok = y_dims[i] == x_dims[i];
  if (!y_ok) return ffi::Error::InvalidArgument("jaxlm_matvec: y must be [..., N]");
  if (max_threads < 1) return ffi::Error::InvalidArgument("jaxlm_matvec: max_threads < 1");
  const int64_t k_size = w_dims[0], n_size = w_dims[1];
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) rows *= x_dims[i];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();

  Team* team = GetTeam(max_threads);
  const int64_t pieces = std::min<int64_t>(std::min<int64_t>(team->size(), max_threads),
                                           std::max<int64_t>(1, n_size / kMinColumns));
  std::unique_lock<std::mutex> lock(team->busy, std::try_to_lock);
  if (pieces == 1 || !lock.owns_lock()) {  // one thread, or another call has the team
    Columns(xp, wp, yp, rows, k_size, n_size, 0, n_size);
    return ffi::Error::Success();
  }
  int64_t chunk = (n_size + pieces - 1) / pieces;
  chunk = (chunk + kAlign - 1) / kAlign * kAlign;
  team->Run(pieces, [&](int64_t block) {
    const int64_t c0 = std::min(n_size, block * chunk), c1 = std::min(n_size, c0 + chunk);
    if (c0 < c1) Columns(xp, wp, yp, rows, k_size, n_size, c0, c1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));
