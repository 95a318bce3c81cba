// Plans of the decode loops live in a table indexed by an integer id (what Python holds) until
// freed; ids are reused. One table per plan type; every access takes its mutex.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace kvyard_decode_plans {

template <class Plan>
class PlanTable {
 public:
  int64_t add(std::unique_ptr<Plan> plan) {
    std::lock_guard<std::mutex> guard(mutex_);
    for (size_t i = 0; i < plans_.size(); ++i)
      if (!plans_[i]) {
        plans_[i] = std::move(plan);
        return static_cast<int64_t>(i);
      }
    plans_.push_back(std::move(plan));
    return static_cast<int64_t>(plans_.size() - 1);
  }

  Plan& at(int64_t id) {
    std::lock_guard<std::mutex> guard(mutex_);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(plans_.size()) && plans_[id], "decode plan ", id,
                " does not exist");
    return *plans_[id];
  }

  // Frees the plan outside the lock (its buffers and tensors are released there).
  void free(int64_t id) {
    std::unique_ptr<Plan> plan;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (id >= 0 && id < static_cast<int64_t>(plans_.size())) plan = std::move(plans_[id]);
    }
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Plan>> plans_;   // index = plan id; null = free
};

}  // namespace kvyard_decode_plans
