// A team for the native decode step: the calling thread (the master) and the other threads of one
// OpenMP region per step (ATen's pool: the threads that run every other op), which take chunks of
// the master's parallel stages.
//
//   session(threads, solo, fn)   fn() on the master while the others serve as helpers; with
//                                solo, or one thread, fn() alone without a region
//   run(fn, ctx, n)              (inside fn) fn(ctx, c) for every chunk c in [0, n), on whichever
//                                team threads are running; returns when all n are done
//
// Why chunks and not a barrier per stage: a barrier waits for every thread to arrive, so when
// another process holds a core and preempts one of our threads, every stage waits out that
// thread's time off the core (measured: a 2-thread step ~4x slower than one thread with one busy
// core beside it). Here the master takes chunks itself and waits only for chunks a helper has
// started: a helper that is not running when a stage begins (still waking up, or preempted)
// costs nothing. A helper preempted in the middle of a chunk still holds its stage up until it is
// back on a core, which on a machine with fewer free cores than threads happens stage after
// stage; the master counts the time it waits for helpers (TSC cycles) for its caller, which then
// runs the next steps solo and tries the team again later. The region's end waits for the helpers
// once per step.
//
// Stages are published in one 64-bit ticket: stage (24 bits) | chunks (20) | next chunk (20);
// a thread takes chunk c with one fetch_add and runs it if c < chunks. The stage's (fn, ctx) sit
// in slot stage % 2: the master rewrites a slot only after the stage two back completed, and a
// thread holding a valid chunk keeps that stage from completing. Helpers spin briefly between
// stages (serial stages are a few microseconds), then sleep on a futex until the next one.
#pragma once

#include <linux/futex.h>
#include <omp.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <exception>

#if defined(__x86_64__)
#include <immintrin.h>
#include <x86intrin.h>
#endif

namespace kvyard_native_step {

class Team {
 public:
  using ChunkFn = void (*)(void* ctx, int64_t chunk);

  Team() = default;
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  template <class Fn>
  void session(int threads, bool solo, const Fn& fn) {
    helpers_ = 0;
    if (solo || threads <= 1) return fn();
    quit_.store(false, std::memory_order_seq_cst);
    std::exception_ptr error;
#pragma omp parallel num_threads(threads)
    {
      if (omp_get_thread_num() == 0) {
        helpers_ = omp_get_num_threads() - 1;
        try {
          fn();
        } catch (...) {
          error = std::current_exception();
        }
        quit_.store(true, std::memory_order_seq_cst);   // before stage_word_ moves: see helper()
        stage_word_.fetch_add(1, std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) futex(FUTEX_WAKE_PRIVATE, INT_MAX);
      } else {
        helper();
      }
    }
    helpers_ = 0;
    if (error) std::rethrow_exception(error);
  }

  // Threads of the running session (1 outside one, and solo).
  int size() const { return helpers_ + 1; }

  // TSC cycles the master waited for helpers' chunks since the last call.
  uint64_t take_wait_cycles() {
    const uint64_t n = wait_cycles_;
    wait_cycles_ = 0;
    return n;
  }

  void run(ChunkFn fn, void* ctx, int64_t n) {
    if (n <= 0) return;
    if (helpers_ == 0 || n == 1) {
      for (int64_t c = 0; c < n; ++c) fn(ctx, c);
      return;
    }
    const uint64_t stage = (++stage_ & STAGE_MASK);
    slots_[stage & 1] = Slot{fn, ctx};
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(stage << 40 | uint64_t(n) << 20, std::memory_order_release);
    stage_word_.store(uint32_t(stage), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex(FUTEX_WAKE_PRIVATE, INT_MAX);
    take_chunks();
    if (done_.load(std::memory_order_acquire) == n) return;
    const uint64_t start = now();
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < SPIN) relax();
      else sched_yield();   // a helper holding a chunk is off its core: let it back on
    }
    wait_cycles_ += now() - start;
  }

  // A cheap clock for the wait share (x86: the TSC; elsewhere the steady clock in ns).
  static uint64_t now() {
#if defined(__x86_64__)
    return __rdtsc();
#else
    return uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
  }

 private:
  struct Slot {
    ChunkFn fn = nullptr;
    void* ctx = nullptr;
  };
  static constexpr uint64_t STAGE_MASK = (1u << 24) - 1, FIELD = (1u << 20) - 1;
  // Pause iterations a waiting thread spins before it gives its core up (~10 ns each on current
  // x86 cores): longer than a small batch's serial stage, far shorter than a time slice.
  static constexpr int SPIN = 4096;

  static void relax() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  long futex(int op, int value) {
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(&stage_word_), op, value, nullptr, nullptr, 0);
  }

  void take_chunks() {
    for (;;) {
      const uint64_t t = ticket_.fetch_add(1, std::memory_order_acq_rel);
      const int64_t n = int64_t(t >> 20 & FIELD), c = int64_t(t & FIELD);
      if (c >= n) return;
      const Slot& slot = slots_[(t >> 40) & 1];
      slot.fn(slot.ctx, c);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // Chunks of the stage in force, then of each stage published after; seen is read before quit_
  // every time, as the master sets quit_ before it moves stage_word_ on.
  void helper() {
    uint32_t seen = stage_word_.load(std::memory_order_seq_cst);
    for (;;) {
      take_chunks();
      if (quit_.load(std::memory_order_seq_cst)) return;
      int spins = 0;
      while (stage_word_.load(std::memory_order_acquire) == seen && spins < SPIN) {
        relax();
        ++spins;
      }
      if (stage_word_.load(std::memory_order_acquire) == seen) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        while (stage_word_.load(std::memory_order_seq_cst) == seen) futex(FUTEX_WAIT_PRIVATE, int(seen));
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      }
      seen = stage_word_.load(std::memory_order_seq_cst);
    }
  }

  int helpers_ = 0;       // the master's: helper threads in the running session
  uint64_t stage_ = 0;   // the master's
  uint64_t wait_cycles_ = 0;   // the master's
  Slot slots_[2];
  std::atomic<bool> quit_{false};
  alignas(64) std::atomic<uint64_t> ticket_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint32_t> stage_word_{0};
  alignas(64) std::atomic<int> sleepers_{0};
};

}  // namespace kvyard_native_step
