// Fused per-token log-prob kernels for the CPU (backend "native").
//
// Forward, per token row r with logits z = row(r) and label y:
//   lse[r] = log(sum_v exp(z_v))   two passes over the row (max, then sum of exp), float32 throughout
//   tok[r] = z_y - lse[r]          0 when y == ignore_index (the row is not even read), NaN when y is
//                                  outside [0, V) (possible only with validate=False; nothing is read)
// With token statistics (logp_forward_stats), per counted row also stats[r, :] = (sum_v softmax(z)_v z_v,
// sum_v z_v, max_v z_v, max of z_v over v < y, z_y or 0): the layout of STATS in torch_chunked.py; the
// max pass is split at the label's column and the sum-of-exp pass carries two more accumulators.
// Backward, per row: grad[r, v] = g[r] * (onehot(y)_v - exp(z_v - lse[r])), rows with g == 0 set to 0
// without reading the logits. grad may alias the logits (in-place backward): each element is read
// before it is written, by the same thread. With softcap c > 0 the logits are soft-capped values
// z = c * tanh(y / c) and each gradient is also multiplied by dz/dy = 1 - (z / c)^2 (the gradient with
// respect to the logits before the cap, for the fused-linear path of Gemma 2/3-style models).
//
// Rows are independent and each is reduced by one thread in a fixed order, so results do not depend on
// the number of threads. A row lives at (r / seq_len) * stride_seq + (r % seq_len) * stride_tok
// elements from the data pointer, so shifted views such as logits[:, :-1] need no copy.
//
// The row loops use ATen's Vectorized<float> (Sleef exp/log, accurate to 1 ulp; AVX-512 or AVX2 when the
// build machine has it). bf16/fp16 rows are widened into a per-thread float32 row buffer first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <c10/core/impl/alloc_cpu.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kStats = 5;  // token statistics per row (STATS in torch_chunked.py)

inline int64_t row_offset(int64_t r, int64_t seq_len, int64_t stride_seq, int64_t stride_tok) {
  return (r / seq_len) * stride_seq + (r % seq_len) * stride_tok;
}

// A row as float32: the data itself for float32, else widened into buf.
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    buf.resize(V);
    for (int64_t v = 0; v < V; ++v) buf[v] = static_cast<float>(src[v]);
    return buf.data();
  }
}

// The maximum of n floats (-inf for none), NaN when any is NaN.
inline float row_max(const float* x, int64_t n) {
  Vec vmax(kNegInf);
  int64_t v = 0;
  for (; v + Vec::size() <= n; v += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + v));
  float m = kNegInf;
  float lanes[Vec::size()];
  vmax.store(lanes);
  for (int i = 0; i < Vec::size(); ++i) m = std::isnan(lanes[i]) || lanes[i] > m ? lanes[i] : m;
  for (; v < n; ++v) m = std::isnan(x[v]) || x[v] > m ? x[v] : m;
  return m;
}

inline float nan_max(float a, float b) { return std::isnan(a) || a > b ? a : b; }

// log(sum exp(x)) of one float32 row: a vectorized max pass, then a vectorized sum-of-exp pass.
inline float row_lse(const float* x, int64_t V) {
  const float m = row_max(x, V);
  if (std::isnan(m)) return m;
  if (m == kNegInf) return kNegInf;  // every logit -inf: log(0)
  if (m == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
  const Vec vm(m);
  // Four independent accumulators: one would make every vector wait for the previous add.
  constexpr int64_t W = 4 * Vec::size();
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t v = 0;
  for (; v + W <= V; v += W) {
    s0 = s0 + (Vec::loadu(x + v) - vm).exp_u20();
    s1 = s1 + (Vec::loadu(x + v + Vec::size()) - vm).exp_u20();
    s2 = s2 + (Vec::loadu(x + v + 2 * Vec::size()) - vm).exp_u20();
    s3 = s3 + (Vec::loadu(x + v + 3 * Vec::size()) - vm).exp_u20();
  }
  for (; v + Vec::size() <= V; v += Vec::size()) s0 = s0 + (Vec::loadu(x + v) - vm).exp_u20();
  Vec vsum = (s0 + s1) + (s2 + s3);
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; v < V; ++v) s += std::exp(x[v] - m);
  return m + std::log(s);
}

// row_lse with the token statistics of the row for label y into st[0..4] (see the top of this file). Its
// sum of exponentials is formed exactly as row_lse's (the same accumulators in the same order), so that
// asking for statistics never changes a log-prob.
inline float row_lse_stats(const float* x, int64_t V, int64_t y, float* st) {
  const int64_t split = std::min<int64_t>(std::max<int64_t>(y, 0), V);
  const float before = row_max(x, split);
  const float m = nan_max(before, row_max(x + split, V - split));
  st[2] = m;
  st[3] = before;
  st[4] = (y >= 0 && y < V) ? x[y] : 0.f;
  if (std::isnan(m) || m == std::numeric_limits<float>::infinity() || m == kNegInf) {
    st[0] = std::numeric_limits<float>::quiet_NaN();  // no distribution to take an expectation over
    st[1] = std::isnan(m) ? m : (m == kNegInf ? kNegInf : std::numeric_limits<float>::quiet_NaN());
    return m == kNegInf ? kNegInf : std::numeric_limits<float>::quiet_NaN();
  }
  const Vec vm(m), lowest(std::numeric_limits<float>::lowest());
  // exp(z - m) * z with -inf clamped to the lowest float: exp(-inf) * -inf would be NaN, not 0.
  constexpr int64_t W = 4 * Vec::size();
  Vec s[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  Vec s1[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  Vec zs[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  int64_t v = 0;
  for (; v + W <= V; v += W) {
    for (int k = 0; k < 4; ++k) {
      const Vec xv = Vec::loadu(x + v + k * Vec::size());
      const Vec e = (xv - vm).exp_u20();
      s[k] = s[k] + e;
      s1[k] = s1[k] + e * at::vec::maximum(xv, lowest);
      zs[k] = zs[k] + xv;
    }
  }
  for (; v + Vec::size() <= V; v += Vec::size()) {
    const Vec xv = Vec::loadu(x + v);
    const Vec e = (xv - vm).exp_u20();
    s[0] = s[0] + e;
    s1[0] = s1[0] + e * at::vec::maximum(xv, lowest);
    zs[0] = zs[0] + xv;
  }
  auto total = [](const Vec* a) {
    Vec both = (a[0] + a[1]) + (a[2] + a[3]);
    return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, both);
  };
  float fs = total(s), fs1 = total(s1), fzs = total(zs);
  for (; v < V; ++v) {
    const float e = std::exp(x[v] - m);
    fs += e;
    fs1 += e * std::max(x[v], std::numeric_limits<float>::lowest());
    fzs += x[v];
  }
  st[0] = fs1 / fs;
  st[1] = fzs;
  return m + std::log(fs);
}

// Rows of log-probs and log-sum-exps; with out_st (non-null) the token statistics too, kStats per row.
template <typename scalar_t>
void forward_impl(const at::Tensor& logits, const at::Tensor& labels, float* out_tok, float* out_lse, float* out_st,
                  int64_t rows, int64_t V, int64_t seq_len, int64_t stride_seq, int64_t stride_tok,
                  int64_t ignore_index) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = lab[r];
      float* st = out_st ? out_st + r * kStats : nullptr;
      if (y == ignore_index) {
        out_tok[r] = 0.f;
        out_lse[r] = 0.f;
        if (st) std::fill(st, st + kStats, 0.f);
        continue;
      }
      const float* x = as_float(base + row_offset(r, seq_len, stride_seq, stride_tok), V, buf);
      const float l = st ? row_lse_stats(x, V, y, st) : row_lse(x, V);
      out_lse[r] = l;
      out_tok[r] = (y >= 0 && y < V) ? x[y] - l : std::numeric_limits<float>::quiet_NaN();
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& logits, at::Tensor& grad, const at::Tensor& labels, const at::Tensor& lse,
                   const at::Tensor& g, int64_t rows, int64_t V, int64_t seq_len, int64_t stride_seq,
                   int64_t stride_tok, int64_t grad_stride_seq, int64_t grad_stride_tok, float softcap) {
  const scalar_t* src_base = logits.data_ptr<scalar_t>();
  scalar_t* dst_base = grad.data_ptr<scalar_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* g_p = g.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, out;
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* dst = dst_base + row_offset(r, seq_len, grad_stride_seq, grad_stride_tok);
      const float gr = g_p[r];
      if (gr == 0.f) {  // ignored token: exact zeros, logits not read (they may hold NaN)
        std::fill(dst, dst + V, scalar_t(0));
        continue;
      }
      const float* x = as_float(src_base + row_offset(r, seq_len, stride_seq, stride_tok), V, buf);
      const int64_t y = lab[r];
      // The true-class term, formed in float32 before anything is rounded or overwritten (o may alias x).
      float target = (y >= 0 && y < V) ? gr * (1.f - std::exp(x[y] - lse_p[r])) : 0.f;
      if (softcap > 0.f && y >= 0 && y < V) target *= 1.f - (x[y] / softcap) * (x[y] / softcap);
      float* o;
      if constexpr (std::is_same_v<scalar_t, float>) {
        o = dst;  // may alias x: element-wise, read before write
      } else {
        out.resize(V);
        o = out.data();
      }
      const Vec vl(lse_p[r]), vng(-gr);
      int64_t v = 0;
      if (softcap > 0.f) {
        const float inv = 1.f / softcap;
        const Vec vinv(inv), one(1.f);
        for (; v + Vec::size() <= V; v += Vec::size()) {
          const Vec xv = Vec::loadu(x + v);
          const Vec t = xv * vinv;
          (vng * (xv - vl).exp() * (one - t * t)).store(o + v);
        }
        for (; v < V; ++v) o[v] = -gr * std::exp(x[v] - lse_p[r]) * (1.f - (x[v] * inv) * (x[v] * inv));
      } else {
        for (; v + Vec::size() <= V; v += Vec::size()) (vng * (Vec::loadu(x + v) - vl).exp()).store(o + v);
        for (; v < V; ++v) o[v] = -gr * std::exp(x[v] - lse_p[r]);
      }
      if (y >= 0 && y < V) o[y] = target;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        for (int64_t i = 0; i < V; ++i) dst[i] = static_cast<scalar_t>(o[i]);
      }
    }
  });
}

// Recycled gradient buffers. A fresh multi-GB CPU allocation is an mmap whose pages the kernel faults in
// and zeroes one 4 KiB page at a time on first write: for N=8, T=1024, V=32000 that costs more than the
// backward kernel itself, on every training step. Like CUDA's caching allocator, a buffer whose tensor
// dies goes back to this cache instead of to the OS, and the next backward of a similar size takes it.
// Idle buffers are kept up to a byte limit (oldest freed first); empty_cache() hands them all back.
struct GradCache {
  std::mutex mu;
  std::list<std::pair<void*, size_t>> idle;  // oldest first
  size_t idle_bytes = 0;
  size_t limit = 0;
  int64_t hits = 0, misses = 0;
};

GradCache& grad_cache() {
  static GradCache* cache = new GradCache();  // never destroyed: tensors may die after static destructors
  return *cache;
}

void evict_until(GradCache& c, size_t limit) {  // caller holds c.mu
  while (c.idle_bytes > limit && !c.idle.empty()) {
    c10::free_cpu(c.idle.front().first);
    c.idle_bytes -= c.idle.front().second;
    c.idle.pop_front();
  }
}

void give_back(void* ptr, size_t bytes) {
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (bytes > c.limit) {
    c10::free_cpu(ptr);
    return;
  }
  c.idle.emplace_back(ptr, bytes);
  c.idle_bytes += bytes;
  evict_until(c, c.limit);
}

// An uninitialized tensor of this shape and dtype; every element is written by logp_backward.
at::Tensor grad_buffer(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = std::max<size_t>(1, static_cast<size_t>(numel) * c10::elementSize(dtype));
  void* ptr = nullptr;
  size_t have = bytes;
  {
    GradCache& c = grad_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    // Best fit among idle buffers no more than twice the request, so a short batch does not pin a long one's.
    auto best = c.idle.end();
    for (auto it = c.idle.begin(); it != c.idle.end(); ++it) {
      if (it->second >= bytes && it->second / 2 <= bytes && (best == c.idle.end() || it->second < best->second)) best = it;
    }
    if (best != c.idle.end()) {
      ptr = best->first;
      have = best->second;
      c.idle_bytes -= have;
      c.idle.erase(best);
      ++c.hits;
    } else {
      ++c.misses;
    }
  }
  if (ptr == nullptr) ptr = c10::alloc_cpu(bytes);
  return at::from_blob(ptr, sizes, [have](void* p) { give_back(p, have); }, at::TensorOptions().dtype(dtype));
}

void set_cache_limit(int64_t limit_bytes) {
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = static_cast<size_t>(std::max<int64_t>(0, limit_bytes));
  evict_until(c, c.limit);
}

std::vector<int64_t> cache_info() {
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {static_cast<int64_t>(c.idle_bytes), static_cast<int64_t>(c.idle.size()), static_cast<int64_t>(c.limit),
          c.hits, c.misses};
}

void check_common(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu(), "safedpo native kernels take CPU tensors");
  TORCH_CHECK(logits.stride(-1) == 1, "logits rows must be contiguous along V");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels must be contiguous int64");
}

// The forward with (stats) or without the token statistics; the third tensor is undefined without.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& labels, int64_t seq_len,
                                                       int64_t stride_seq, int64_t stride_tok, int64_t ignore_index,
                                                       bool stats) {
  check_common(logits, labels);
  const int64_t rows = labels.numel();
  const int64_t V = logits.size(-1);
  auto tok = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor st = stats ? at::empty({rows, kStats}, logits.options().dtype(at::kFloat)) : at::Tensor();
  if (rows == 0) return {tok, lse, st};
  TORCH_CHECK(seq_len > 0, "seq_len must be positive");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "safedpo_logp_forward", [&] {
    forward_impl<scalar_t>(logits, labels, tok.data_ptr<float>(), lse.data_ptr<float>(),
                           stats ? st.data_ptr<float>() : nullptr, rows, V, seq_len, stride_seq, stride_tok,
                           ignore_index);
  });
  return {tok, lse, st};
}

std::tuple<at::Tensor, at::Tensor> logp_forward(const at::Tensor& logits, const at::Tensor& labels, int64_t seq_len,
                                                int64_t stride_seq, int64_t stride_tok, int64_t ignore_index) {
  auto [tok, lse, st] = forward(logits, labels, seq_len, stride_seq, stride_tok, ignore_index, false);
  return {tok, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logp_forward_stats(const at::Tensor& logits, const at::Tensor& labels,
                                                                  int64_t seq_len, int64_t stride_seq,
                                                                  int64_t stride_tok, int64_t ignore_index) {
  return forward(logits, labels, seq_len, stride_seq, stride_tok, ignore_index, true);
}

void logp_backward(const at::Tensor& logits, at::Tensor grad, const at::Tensor& labels, const at::Tensor& lse,
                   const at::Tensor& g, int64_t seq_len, int64_t stride_seq, int64_t stride_tok,
                   int64_t grad_stride_seq, int64_t grad_stride_tok, double softcap) {
  check_common(logits, labels);
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.stride(-1) == 1, "grad must match logits");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  g.is_contiguous(), "lse and g must be contiguous float32");
  const int64_t rows = labels.numel();
  TORCH_CHECK(lse.numel() == rows && g.numel() == rows, "lse and g must have one value per row");
  if (rows == 0) return;
  const int64_t V = logits.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "safedpo_logp_backward", [&] {
    backward_impl<scalar_t>(logits, grad, labels, lse, g, rows, V, seq_len, stride_seq, stride_tok, grad_stride_seq,
                            grad_stride_tok, static_cast<float>(softcap));
  });
}

}  // namespace

TORCH_LIBRARY(safedpo_native, m) {
  m.def("logp_forward(Tensor logits, Tensor labels, int seq_len, int stride_seq, int stride_tok, int ignore_index)"
        " -> (Tensor, Tensor)");
  m.def("logp_forward_stats(Tensor logits, Tensor labels, int seq_len, int stride_seq, int stride_tok,"
        " int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def("logp_backward(Tensor logits, Tensor(a!) grad, Tensor labels, Tensor lse, Tensor g, int seq_len,"
        " int stride_seq, int stride_tok, int grad_stride_seq, int grad_stride_tok, float softcap) -> ()");
  m.def("grad_buffer(int[] sizes, ScalarType dtype) -> Tensor", &grad_buffer);
  m.def("set_cache_limit(int limit_bytes) -> ()", &set_cache_limit);
  m.def("cache_info() -> int[]", &cache_info);
}

TORCH_LIBRARY_IMPL(safedpo_native, CPU, m) {
  m.impl("logp_forward", &logp_forward);
  m.impl("logp_forward_stats", &logp_forward_stats);
  m.impl("logp_backward", &logp_backward);
}
