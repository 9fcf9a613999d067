// Which routes and fallbacks the methods took, counted so the Python side can log them
// (core.take_route_counts()). One locked map update per matrix, never per element.
#pragma once
#include <map>
#include <mutex>
#include <string>

namespace isofast {

class RouteLog {
 public:
  static RouteLog& instance() {
    static RouteLog log;
    return log;
  }
  void note(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counts_[what];
  }
  // The counts since the last call, and a fresh start.
  std::map<std::string, long long> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::map<std::string, long long> out;
    out.swap(counts_);
    return out;
  }

 private:
  std::mutex mutex_;
  std::map<std::string, long long> counts_;
};

inline void note_route(const std::string& what) { RouteLog::instance().note(what); }

}  // namespace isofast
