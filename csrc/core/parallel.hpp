// parallel_for over [0, n) in contiguous blocks with plain std::threads. The first exception
// thrown by any block is rethrown on the calling thread.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace isofast {

template <class Fn>
void parallel_for(size_t n, int threads, Fn&& fn) {
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(threads), n));
  if (workers <= 1) {
    if (n) fn(size_t{0}, n);
    return;
  }
  std::exception_ptr first_error;
  std::mutex error_mutex;
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  auto run = [&](size_t w) {
    const size_t begin = n * w / workers, end = n * (w + 1) / workers;
    try {
      fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };
  for (size_t w = 1; w < workers; ++w) pool.emplace_back(run, w);
  run(0);
  for (auto& t : pool) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

// Runs worker(take) on up to `threads` threads; take() hands out 0, 1, ..., n - 1 once each,
// then values >= n. Items go to whichever thread is free: with static halves, a thread that
// another process (or the pipeline's own writer) slowed down held up the join with half the
// work left.
template <class Worker>
void parallel_take(size_t n, int threads, Worker&& worker) {
  std::atomic<size_t> next{0};
  auto take = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(threads), n));
  parallel_for(workers, static_cast<int>(workers), [&](size_t, size_t) { worker(take); });
}

}  // namespace isofast
