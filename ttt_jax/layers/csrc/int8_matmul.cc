// Weight-only 8-bit matrix product for CPU decoding, called from JAX through the XLA FFI.
//
//   y[m, n] = sum_g ( scale[n, g] * sum_{k in g} x[m, k] * q[n, k]  +  offset[n, g] * xsum[m, g] )
//
//   x: f32 [..., K]; q: u8 [N, K]; scale, offset: f32 [N, K / G]; xsum[m, g] = sum_{k in g} x[m, k].
//   Row n of the weight matrix is w[n, k] = scale[n, g] * q[n, k] + offset[n, g] for the group g
//   of G consecutive k holding k (G = K: one group per row).
//   4-bit codes: q: u8 [N, K / 32, 16], G = 32; byte j of a group's 16 holds the code of its
//   weight j in the low half and of its weight j + 16 in the high half.
//
// A decode step multiplies one activation row by every weight matrix of the model, so its time is
// the time to read the weights: 8-bit codes read a quarter of float32's bytes (4-bit codes an
// eighth) and are widened to float32 in registers, never in memory. The output rows are split over a small pool of threads
// that spin briefly between calls (a decode step makes a few hundred, microseconds apart), then
// sleep. Build and load: ttt_jax/layers/cpu_kernel.py; layout and rounding: ttt_jax/layers/int8.py.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const uint8_t* q;
  const float* scale;
  const float* offset;
  float* y;
  int64_t m, n, k, g;
  int bits;           // 8 or 4
  int64_t row_bytes;  // of q: k or k / 2
};

// Code i of a row (any layout; the scalar path's reader).
inline float Code(const uint8_t* row, int64_t i, int bits) {
  if (bits == 8) return static_cast<float>(row[i]);
  const int64_t in_group = i % 32;
  return static_cast<float>((row[(i / 32) * 16 + in_group % 16] >> (4 * (in_group / 16))) & 15);
}

// The vector unit: kLanes float32 lanes (AVX-512: 16, AVX2: 8, none: 0 = the scalar Dot1 only).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Widen(const uint8_t* p) {  // 16 codes -> 16 float32
  return _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec Widen4(const uint8_t* p, int half) {  // 16 bytes' low or high halves -> 16 float32
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  b = _mm_and_si128(half ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(15));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Set1(float v) { return _mm512_set1_ps(v); }
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
using Vec = __m256;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Widen(const uint8_t* p) {  // 8 codes -> 8 float32
  return _mm256_cvtepi32_ps(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec Widen4(const uint8_t* p, int half) {  // 8 bytes' low or high halves -> 8 float32
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  b = _mm_and_si128(half ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(15));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Set1(float v) { return _mm256_set1_ps(v); }
inline float Sum(Vec v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#else
constexpr int kLanes = 0;
#endif

// One weight row against one activation row (any group size).
float Dot1(const float* x, const uint8_t* q, const float* scale, const float* offset, int64_t k,
           int64_t g, int bits) {
  float total = 0.f;
  for (int64_t j = 0; j < k / g; ++j) {
    float xq = 0.f, xs = 0.f;
    for (int64_t i = j * g; i < (j + 1) * g; ++i) {
      xq += x[i] * Code(q, i, bits);
      xs += x[i];
    }
    total += scale[j] * xq + offset[j] * xs;
  }
  return total;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Rows are read ahead by software prefetch: the hardware prefetcher stops at every 4 KiB page,
// and a decode step's weights are many separate buffers (measured on a 2-core AMD EPYC, a
// SmolLM2-135M-shaped step: 14.1 ms without, 6.0 ms with on one thread; 6.8 / 3.4 ms on two).
constexpr int kAhead = 8;

// Weight rows [n, n + 4) against activation rows [r0, r0 + M), G a multiple of kLanes. Each
// group's codes are widened to float32 weights (scale * q + offset) in registers once and serve
// all M activation rows: 4 x M accumulators, reduced across lanes once, at the end.
template <int M, int kBits>
void Tile(const Problem& p, int64_t n, int64_t r0) {
  const int64_t k = p.k, g = p.g, groups = k / g, rb = p.row_bytes;
  const uint8_t* q = p.q + n * rb;
  const float* scale = p.scale + n * groups;
  const float* offset = p.offset + n * groups;
  const float* x = p.x + r0 * k;
  Vec acc[M][4];
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < 4; ++r) acc[m][r] = Zero();
  }
  for (int64_t j = 0; j < groups; ++j) {
    Vec s[4], o[4];
    for (int r = 0; r < 4; ++r) {
      s[r] = Set1(scale[r * groups + j]);
      o[r] = Set1(offset[r * groups + j]);
    }
    for (int64_t i = j * g; i < (j + 1) * g; i += kLanes) {
      const int64_t at = kBits == 8 ? i : j * 16 + (i - j * g) % 16;  // byte of the chunk
      if (r0 == 0 && at % 64 == 0) {  // the same cache line kAhead rows ahead (never faults)
        for (int r = kAhead; r < kAhead + 4; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(q + r * rb + at), _MM_HINT_T0);
        }
      }
      Vec w[4];
      for (int r = 0; r < 4; ++r) {
        const Vec codes = kBits == 8 ? Widen(q + r * rb + at)
                                     : Widen4(q + r * rb + at, int((i - j * g) / 16));
        w[r] = Fma(codes, s[r], o[r]);
      }
      for (int m = 0; m < M; ++m) {
        const Vec xv = Load(x + m * k + i);
        for (int r = 0; r < 4; ++r) acc[m][r] = Fma(xv, w[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < 4; ++r) p.y[(r0 + m) * p.n + n + r] = Sum(acc[m][r]);
  }
}

// Activation rows per tile: AVX-512's 32 registers hold 4 x 4 accumulators and the widened
// weights; AVX2's 16 hold 2 x 4.
constexpr int kTileRows = kLanes == 16 ? 4 : 2;

// Weight rows [n, n + 4) against every activation row, in tiles of kTileRows, then single rows.
template <int kBits>
void Block(const Problem& p, int64_t n) {
  int64_t r = 0;
  for (; r + kTileRows <= p.m; r += kTileRows) Tile<kTileRows, kBits>(p, n, r);
  for (; r < p.m; ++r) Tile<1, kBits>(p, n, r);
}
#endif

// Output columns [n0, n1) of every activation row. Weight rows are the outer loop, so each block
// of four is read from memory once and, widened in registers, serves every activation row.
void Solve(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t k = p.k, g = p.g, n_out = p.n, groups = k / g;
  int64_t n = n0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (g % kLanes == 0) {
    for (; n + 4 <= n1; n += 4) {
      if (p.bits == 8) {
        Block<8>(p, n);
      } else {
        Block<4>(p, n);
      }
    }
  }
#endif
  for (; n < n1; ++n) {
    for (int64_t r = 0; r < p.m; ++r) {
      p.y[r * n_out + n] = Dot1(p.x + r * k, p.q + n * p.row_bytes, p.scale + n * groups,
                                p.offset + n * groups, k, g, p.bits);
    }
  }
}

// The caller plus (threads - 1) workers. A call publishes its problem by bumping `generation_`;
// workers spin on it for up to kSpin, then sleep on the condition variable until the next call.
class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    for (int t = 1; t < threads_; ++t) std::thread([this, t] { Work(t); }).detach();
  }

  int threads() const { return threads_; }

  void Run(const Problem& p) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || threads_ == 1) {  // another call in flight: compute here alone
      Solve(p, 0, p.n);
      return;
    }
    problem_ = p;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    Part(0);
    while (pending_.load(std::memory_order_acquire) != 0) Relax();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(300);

  static void Relax() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }

  void Part(int t) {  // thread t's share of the columns, in whole blocks of 4
    const int64_t blocks = (problem_.n + 3) / 4;
    const int64_t b0 = blocks * t / threads_, b1 = blocks * (t + 1) / threads_;
    Solve(problem_, std::min(problem_.n, 4 * b0), std::min(problem_.n, 4 * b1));
  }

  void Work(int t) {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        Relax();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      Part(t);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int threads_;
  Problem problem_{};
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
};

std::atomic<int> requested_threads{1};

Pool& GetPool() {
  static Pool* pool = new Pool(requested_threads.load());  // never destroyed: workers detached
  return *pool;
}

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = q.dimensions();
  const auto xd = x.dimensions();
  const auto sd = scale.dimensions();
  const auto od = offset.dimensions();
  const auto yd = y->dimensions();
  const int64_t k = xd.size() ? xd[xd.size() - 1] : -1;
  const int bits = qd.size() == 3 ? 4 : 8;
  if ((qd.size() != 2 && qd.size() != 3) || xd.size() == 0 || sd.size() != 2 || od.size() != 2 ||
      sd[0] != qd[0] || od[0] != qd[0] ||
      od[1] != sd[1] || sd[1] == 0 || k % sd[1] != 0 ||
      (bits == 8 && (qd.size() != 2 || qd[1] != k)) ||
      (bits == 4 && (qd[1] != sd[1] || qd[2] != 16 || sd[1] * 32 != k)) || yd.size() != xd.size() ||
      yd[yd.size() - 1] != qd[0] ||
      int64_t(y->element_count()) * k != int64_t(x.element_count()) * qd[0]) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: expected x [..., K], q [N, K] (8-bit) or [N, K / 32, 16] (4-bit), scale "
        "and offset [N, K / G]");
  }
  if (k == 0) {  // empty sums
    std::fill(y->typed_data(), y->typed_data() + y->element_count(), 0.f);
    return ffi::Error::Success();
  }
  Problem p{x.typed_data(), q.typed_data(), scale.typed_data(), offset.typed_data(),
            y->typed_data(), int64_t(x.element_count()) / k, qd[0], k, k / sd[1], bits,
            bits == 8 ? k : k / 2};
  GetPool().Run(p);
  return ffi::Error::Success();
}

}  // namespace

extern "C" {
// Float32 lanes of the vector path this library was built with (16, 8; 0: scalar only).
int TttInt8VectorLanes() { return kLanes; }

// Threads of the pool; only the first call before the first product takes effect.
int TttInt8SetThreads(int threads) {
  requested_threads.store(std::max(1, threads));
  return GetPool().threads();
}
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
