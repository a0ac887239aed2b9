// The kernels' worker threads: a small pool whose idle workers sleep.
//
// Why not OpenMP: libgomp's idle workers keep spinning (its default wait policy) after every
// parallel region, on the same cores MindSpore's own CPU thread pool needs for the next ops of
// the step. Profiled inside a training step, that made MindSpore's Mul/Transpose/Sub/Add up to 4x
// slower next to the fused op. Here a worker spins for at most kSpinMicros after its last task (the
// next region of the same kernel call usually starts within that), then blocks on a condition
// variable. Setting OMP_WAIT_POLICY for the user is not an option: it changes every OpenMP user
// in the process.
//
// Threads: MINDFORMERS_LORA_EXT_CPU_THREADS, else OMP_NUM_THREADS when set (the usual knob for CPU
// kernels), else the CPUs this process may run on. A call made while another thread's call owns
// the pool runs on its caller alone (MindSpore may launch two kernels at once; neither waits).
// The pool is re-created in a forked child (its workers do not exist there).
#ifndef MINDFORMERS_LORA_EXT_THREAD_POOL_H_
#define MINDFORMERS_LORA_EXT_THREAD_POOL_H_

#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace flk_pool {

#ifndef FLK_SPIN_MICROS
#define FLK_SPIN_MICROS 50
#endif
static const long kSpinMicros = FLK_SPIN_MICROS;  // idle spin before sleeping (well under one MindSpore op)

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Threads a parallel region may use (>= 1): MINDFORMERS_LORA_EXT_CPU_THREADS, else
// OMP_NUM_THREADS's first value, else the CPU count.
inline int max_threads() {
  static const int n = [] {
    for (const char* name : {"MINDFORMERS_LORA_EXT_CPU_THREADS", "OMP_NUM_THREADS"}) {
      const char* env = getenv(name);
      if (!env || !*env) continue;
      const long v = strtol(env, 0, 10);
      if (v >= 1) return (int)(v < 1024 ? v : 1024);
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      const int c = CPU_COUNT(&set);
      if (c >= 1) return c;
    }
    const unsigned h = std::thread::hardware_concurrency();
    return h >= 1 ? (int)h : 1;
  }();
  return n;
}

struct Pool;

// One thread's view of a running region: its index, the team size, and the team's sync state.
class Team {
 public:
  Team(Pool* pool, int tid, int size) : pool_(pool), tid_(tid), size_(size) {}
  int tid() const { return tid_; }
  int size() const { return size_; }
  // [*begin, *end): this thread's contiguous share of n items (OpenMP's schedule(static)).
  void range(long n, long* begin, long* end) const {
    *begin = n * tid_ / size_;
    *end = n * (tid_ + 1) / size_;
  }
  template <class F>
  void for_static(long n, F&& f) const {  // no barrier after it (OpenMP's nowait)
    long b, e;
    range(n, &b, &e);
    for (long i = b; i < e; ++i) f(i);
  }
  template <class F>
  void for_dynamic(long n, F&& f);  // items handed out one at a time; ends with a barrier
  void barrier();

 private:
  Pool* pool_;
  int tid_, size_;
  long dynamic_instances_ = 0;
};

struct Pool {
  typedef void (*Task)(void* ctx, Team& team);

  std::mutex submit;  // owned by the thread whose region runs
  std::mutex m;       // guards sleeping, with cv
  std::condition_variable cv;
  std::vector<std::thread> workers;
  pid_t pid;
  // the current region (written by the submitter before `generation` is bumped)
  Task task = 0;
  void* ctx = 0;
  int size = 1;
  std::atomic<unsigned long> generation{0};
  std::atomic<int> unfinished{0};
  // barrier and dynamic-loop state of the current region
  std::atomic<int> arrived{0};
  std::atomic<unsigned long> barrier_phase{0};
  std::atomic<long> dynamic_next[2];

  explicit Pool(int n_workers) : pid(getpid()) {
    dynamic_next[0].store(0);
    dynamic_next[1].store(0);
    for (int w = 1; w <= n_workers; ++w) workers.emplace_back([this, w] { work(w); });
    for (std::thread& t : workers) t.detach();  // the pool lives until the process ends
  }

  // Spin up to kSpinMicros, then sleep until done() (re-checked under m: no lost wake-up).
  template <class Pred>
  void wait_until(Pred done) {
    if (done()) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    for (int i = 1;; ++i) {
      cpu_relax();
      if (done()) return;
      if ((i & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
    }
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, done);
  }

  void wake_all() {
    { std::lock_guard<std::mutex> lock(m); }  // a sleeper is either waiting already or re-checks
    cv.notify_all();
  }

  // Every worker acknowledges every region, in the team or not: the next region cannot start
  // while a worker still reads this one's task and size.
  void work(int w) {
    unsigned long seen = 0;
    for (;;) {
      wait_until([&] { return generation.load(std::memory_order_acquire) != seen; });
      seen = generation.load(std::memory_order_acquire);
      if (w < size) {
        Team team(this, w, size);
        task(ctx, team);
      }
      if (unfinished.fetch_sub(1, std::memory_order_acq_rel) == 1) wake_all();
    }
  }

  void run(int n, Task t, void* c) {
    Team self(this, 0, n);
    task = t;
    ctx = c;
    size = n;
    arrived.store(0, std::memory_order_relaxed);
    dynamic_next[0].store(0, std::memory_order_relaxed);
    dynamic_next[1].store(0, std::memory_order_relaxed);
    unfinished.store((int)workers.size(), std::memory_order_relaxed);
    generation.fetch_add(1, std::memory_order_acq_rel);
    wake_all();
    t(c, self);
    wait_until([&] { return unfinished.load(std::memory_order_acquire) == 0; });
  }
};

inline void Team::barrier() {
  if (size_ == 1) return;
  Pool* p = pool_;
  const unsigned long phase = p->barrier_phase.load(std::memory_order_acquire);
  if (p->arrived.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
    p->arrived.store(0, std::memory_order_relaxed);
    p->barrier_phase.fetch_add(1, std::memory_order_acq_rel);
    p->wake_all();
  } else {
    p->wait_until([&] { return p->barrier_phase.load(std::memory_order_acquire) != phase; });
  }
}

template <class F>
void Team::for_dynamic(long n, F&& f) {
  // Two counters used in turn: the one for the next loop was last used by the previous loop,
  // which every thread has left (its closing barrier), so thread 0 may reset it now.
  if (size_ == 1) {
    for (long i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<long>& next = pool_->dynamic_next[dynamic_instances_ & 1];
  if (tid_ == 0) pool_->dynamic_next[(dynamic_instances_ + 1) & 1].store(0, std::memory_order_relaxed);
  ++dynamic_instances_;
  for (long i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
  barrier();
}

inline Pool* pool() {
  static std::mutex create;
  static std::atomic<Pool*> current{0};
  Pool* p = current.load(std::memory_order_acquire);
  if (p && p->pid == getpid()) return p;
  std::lock_guard<std::mutex> lock(create);
  p = current.load(std::memory_order_acquire);
  if (!p || p->pid != getpid()) {  // first use, or a forked child (the parent's pool is leaked)
    p = new Pool(max_threads() - 1);
    current.store(p, std::memory_order_release);
  }
  return p;
}

// Runs f(team) on `threads` threads (the caller is thread 0) and returns when all are done.
template <class F>
void parallel(int threads, F&& f) {
  if (threads > max_threads()) threads = max_threads();
  Pool* p = threads > 1 ? pool() : 0;
  if (p && p->submit.try_lock()) {
    struct Call {
      static void run(void* ctx, Team& team) { (*static_cast<F*>(ctx))(team); }
    };
    p->run(threads, &Call::run, (void*)&f);
    p->submit.unlock();
    return;
  }
  Team alone(p, 0, 1);  // one thread, or the pool is busy with another caller's region
  f(alone);
}

}  // namespace flk_pool

#endif  // MINDFORMERS_LORA_EXT_THREAD_POOL_H_
