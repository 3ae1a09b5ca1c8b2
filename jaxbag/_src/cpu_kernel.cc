// jaxbag CPU kernel (XLA FFI): bag reduction streaming each row into its bag's accumulator.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Mode : int64_t { kSum = 0, kMean = 1, kMax = 2, kSqrtn = 3 };

struct Args {
  const float* w; int64_t V; int64_t D;
  const int32_t* ids; const float* psw; int64_t N; int64_t B;
  int64_t mode; int64_t pad;
  const int64_t* start;  // [B + 1]: bag b is positions [start[b], start[b + 1])
  float* out; int32_t* arg;
};

// Prefetches the first kBytes (capped at 1 KiB) of the row kAhead = 16 positions ahead (as
// fbgemm); the next bag's rows usually follow, so it prefetches across bag ends too. kBytes = 0:
// the row's runtime width. The empty asm keeps the loop: GCC 12 deleted a loop of prefetches
// alone as having no effect (even with a constant trip count), so the kernel ran without
// prefetching, at half the speed.
template <int kBytes>
inline void Prefetch(const Args& a, int64_t p) {
  constexpr int64_t kAhead = 16;
  if (p + kAhead >= a.N) return;
  const int64_t id = a.ids[p + kAhead];
  if (id < 0 || id >= a.V) return;
  const char* row = reinterpret_cast<const char*>(a.w + id * a.D);
  const int64_t bytes = std::min<int64_t>(kBytes > 0 ? kBytes : a.D * 4, 1024);
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(row + off);
    asm volatile("" : : "r"(row + off));
  }
}

// Whether an id counts in its bag: a valid id that is not padding. Callers copy the Args fields
// into locals first: read through a reference or a struct in the loop, they kept GCC from holding
// the accumulators in registers.
inline bool Take(int64_t id, int64_t V, int64_t pad) { return id >= 0 && id < V && id != pad; }

// Calls body(p, row) for each position p in [n0, n1) (one bag) that counts (Take), with row its
// columns from c0, prefetching ahead. kWhole: the block is the whole row (the prefetch width is
// then compile-time too).
template <int kW, bool kWhole, typename F>
inline void ForRows(const Args& a, int64_t n0, int64_t n1, int64_t c0, F&& body) {
  const float* base = a.w + c0;
  const int64_t D = a.D;
  const int32_t* ids = a.ids;
  const int64_t V = a.V, pad = a.pad;
  for (int64_t p = n0; p < n1; ++p) {
    Prefetch<kWhole ? kW * 4 : 0>(a, p);
    const int64_t id = ids[p];
    if (Take(id, V, pad)) body(p, base + id * D);
  }
}

// sum / mean / sqrtn of one bag, columns [c0, c0 + kW) of rows of stride D. The width, the mode
// and whether there are weights are compile-time, so the accumulators stay in registers and the
// loop over positions carries only what its mode needs.
template <int kW, int kMode, bool kWeighted, bool kWhole>
inline void SumBlock(const Args& a, int64_t n0, int64_t n1, int64_t c0, float* o) {
  float acc[kW] = {};
  // The divisor: a weighted bag's weights (squares for sqrtn) are summed in float32, as the XLA
  // formulation and the gradient rule sum them, so the value, its gradient and the zero-divisor
  // rule agree (a float64 sum made weights summing to 0 in float32 a huge bag with a zero
  // gradient). An unweighted bag's count is exact.
  float wden = 0.0f;
  int64_t count = 0;
  ForRows<kW, kWhole>(a, n0, n1, c0, [&](int64_t p, const float* __restrict__ r) {
    if constexpr (kWeighted) {
      const float c = a.psw[p];
      wden += kMode == kSqrtn ? c * c : c;
      for (int d = 0; d < kW; ++d) acc[d] += c * r[d];
    } else {
      ++count;
      for (int d = 0; d < kW; ++d) acc[d] += r[d];
    }
  });
  float scale = 1.0f;
  if constexpr (kMode == kMean || kMode == kSqrtn) {
    if constexpr (kWeighted) {
      const float den = kMode == kSqrtn ? std::sqrt(wden) : wden;
      scale = den != 0.0f ? 1.0f / den : 0.0f;
    } else {
      const double den = kMode == kSqrtn ? std::sqrt(static_cast<double>(count))
                                         : static_cast<double>(count);
      scale = count != 0 ? static_cast<float>(1.0 / den) : 0.0f;
    }
  }
  // (a zero divisor gives +0, as the XLA formulation, not acc * 0 = -0 for a negative sum)
  for (int d = 0; d < kW; ++d) o[d] = scale != 0.0f ? acc[d] * scale : 0.0f;
}

// max of one bag, columns [c0, c0 + kW), with the first arg-max position per column in g.
template <int kW, bool kWhole>
inline void MaxBlock(const Args& a, int64_t n0, int64_t n1, int64_t c0, float* o,
                     int32_t* g) {
  float acc[kW];
  int32_t arg[kW];
  for (int d = 0; d < kW; ++d) { acc[d] = 0.0f; arg[d] = static_cast<int32_t>(a.N); }
  bool any = false;
  ForRows<kW, kWhole>(a, n0, n1, c0, [&](int64_t p, const float* __restrict__ r) {
    const int32_t pp = static_cast<int32_t>(p);
    if (!any) {
      for (int d = 0; d < kW; ++d) { acc[d] = r[d]; arg[d] = pp; }
      any = true;
      return;
    }
    for (int d = 0; d < kW; ++d) {
      // The first NaN wins and stays (NaN propagates, as in jnp.max; torch's CPU kernel drops a
      // NaN that follows a number).
      const bool better = r[d] > acc[d] || (r[d] != r[d] && acc[d] == acc[d]);
      acc[d] = better ? r[d] : acc[d];
      arg[d] = better ? pp : arg[d];
    }
  });
  for (int d = 0; d < kW; ++d) { o[d] = acc[d]; g[d] = arg[d]; }
}

template <int kW, int kMode, bool kWeighted, bool kWhole = false>
inline void Block(const Args& a, int64_t n0, int64_t n1, int64_t c0, float* o,
                  int32_t* g) {
  if constexpr (kMode == kMax) {
    MaxBlock<kW, kWhole>(a, n0, n1, c0, o, g);
  } else {
    SumBlock<kW, kMode, kWeighted, kWhole>(a, n0, n1, c0, o);
  }
}

// Columns [c0, D) in blocks of kW, then of kW / 4, ..., 1 (a row width that is not 16-256).
template <int kW, int kMode, bool kWeighted>
inline void Blocks(const Args& a, int64_t n0, int64_t n1, int64_t c0, float* o,
                   int32_t* g) {
  for (; c0 + kW <= a.D; c0 += kW) {
    Block<kW, kMode, kWeighted>(a, n0, n1, c0, o + c0, g ? g + c0 : nullptr);
  }
  if constexpr (kW > 1) Blocks<kW / 4, kMode, kWeighted>(a, n0, n1, c0, o, g);
}

// Bags [b0, b1): rows of 16-256 features in one block, other widths in blocks of 64, 16, 4, 1.
template <int kMode, bool kWeighted>
void BagsOf(const Args& a, int64_t b0, int64_t b1) {
  const int64_t D = a.D;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = a.start[b], n1 = a.start[b + 1];
    float* o = a.out + b * D;
    int32_t* g = kMode == kMax ? a.arg + b * D : nullptr;
    switch (D) {
      case 16: Block<16, kMode, kWeighted, true>(a, n0, n1, 0, o, g); continue;
      case 32: Block<32, kMode, kWeighted, true>(a, n0, n1, 0, o, g); continue;
      case 64: Block<64, kMode, kWeighted, true>(a, n0, n1, 0, o, g); continue;
      case 128: Block<128, kMode, kWeighted, true>(a, n0, n1, 0, o, g); continue;
      case 256: Block<256, kMode, kWeighted, true>(a, n0, n1, 0, o, g); continue;
      default: Blocks<64, kMode, kWeighted>(a, n0, n1, 0, o, g);
    }
  }
}

void Bags(const Args& a, int64_t b0, int64_t b1) {
  const bool weighted = a.psw != nullptr;
  switch (a.mode) {
    case kSum:
      return weighted ? BagsOf<kSum, true>(a, b0, b1) : BagsOf<kSum, false>(a, b0, b1);
    case kMean:
      return weighted ? BagsOf<kMean, true>(a, b0, b1) : BagsOf<kMean, false>(a, b0, b1);
    case kSqrtn:
      return weighted ? BagsOf<kSqrtn, true>(a, b0, b1) : BagsOf<kSqrtn, false>(a, b0, b1);
    default:
      return BagsOf<kMax, false>(a, b0, b1);
  }
}

// Runs body(lo, hi) over `chunks` consecutive ranges splitting [0, n) on XLA's intra-op pool
// (the calling thread works too) and returns when all are done. A task the pool starts late
// finds no chunk left and never calls body.
template <typename F>
void ParallelRanges(ffi::ThreadPool& pool, int64_t n, int64_t chunks, F body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (chunks <= 1 || threads == 1) {
    body(int64_t{0}, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, chunks, n, body]() {
    for (;;) {
      const int64_t c = st->next.fetch_add(1);
      if (c >= chunks) return;
      body(n * c / chunks, n * (c + 1) / chunks);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work]() { work(); });
  work();
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Every bag of a.start, split over XLA's intra-op pool when there is enough work.
void BagRanges(ffi::ThreadPool& pool, const Args& a) {
  const int64_t B = a.B;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t span = a.start[B] - a.start[0];
  const int64_t chunks =
      (span * a.D < (int64_t{1} << 15) || threads == 1) ? 1 : std::min<int64_t>(B, 4 * threads);
  if (chunks == 1) {
    Bags(a, 0, B);
    return;
  }
  // Bag boundaries splitting the ids evenly (balanced for skewed bags).
  std::vector<int64_t> cuts(chunks + 1, B);
  cuts[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = a.start[0] + span * c / chunks;
    const int64_t b = std::upper_bound(a.start, a.start + B, target) - a.start - 1;
    cuts[c] = std::min<int64_t>(B, std::max<int64_t>(cuts[c - 1], b));
  }
  // one chunk index per range (ParallelRanges returns once all are done: references stay valid)
  ParallelRanges(pool, chunks, chunks, [&a, &cuts](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) Bags(a, cuts[c], cuts[c + 1]);
  });
}

ffi::Error BagFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::S32> ids,
                  ffi::Buffer<ffi::S32> bounds, ffi::Buffer<ffi::F32> psw,
                  ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::S32> arg, int64_t mode,
                  int64_t padding_idx, int64_t layout) {
  const auto wd = weight.dimensions();
  const auto od = out->dimensions();
  if (wd.size() != 2 || od.size() != 2 || od[1] != wd[1]) {
    return ffi::Error::InvalidArgument("jaxbag kernel: weight must be [V, D] and out [B, D]");
  }
  const int64_t N = static_cast<int64_t>(ids.element_count());
  const int64_t B = od[0];
  const bool weighted = mode != kMax && static_cast<int64_t>(psw.element_count()) == N;
  if (mode == kMax && static_cast<int64_t>(arg->element_count()) != B * od[1]) {
    return ffi::Error::InvalidArgument("jaxbag kernel: mode max needs a [B, D] arg output");
  }
  if (mode != kMax) {  // no arg-max: the [B, 1] output says "none" (N), as the stream loop
    int32_t* g = arg->typed_data();
    std::fill(g, g + arg->element_count(), static_cast<int32_t>(N));
  }
  std::vector<int64_t> start(B + 1, N);
  const int32_t* bd = bounds.typed_data();
  const int64_t K = static_cast<int64_t>(bounds.element_count());
  const int32_t* id_data = ids.typed_data();
  const float* psw_data = weighted ? psw.typed_data() : nullptr;
  // Unsorted segment ids only (not checked under jit): the positions grouped by bag (pos[j] is
  // the position at j), and the ids and weights in that order.
  std::vector<int64_t> pos;
  std::vector<int32_t> ids_by_bag;
  std::vector<float> psw_by_bag;
  if (layout == 0) {  // segment ids [N]
    if (K != N) return ffi::Error::InvalidArgument("jaxbag kernel: segment ids must be [N]");
    bool sorted = true;
    for (int64_t k = 1; k < N && sorted; ++k) sorted = bd[k] >= bd[k - 1];
    if (sorted) {
      for (int64_t b = 0; b <= B; ++b) {
        start[b] = std::lower_bound(bd, bd + N, static_cast<int32_t>(b)) - bd;
      }
    } else {
      // A stable counting sort by bag (positions outside [0, B) last, in no bag), so that each
      // position counts in the bag its id names, as in jax.ops.segment_sum, the XLA path and
      // the gradient rule, and a bag's first arg-max is still its first position.
      std::vector<int64_t> next(B + 1, 0);
      for (int64_t p = 0; p < N; ++p) {
        if (bd[p] >= 0 && bd[p] < B) ++next[bd[p] + 1];
      }
      for (int64_t b = 0; b < B; ++b) next[b + 1] += next[b];
      std::copy(next.begin(), next.end(), start.begin());
      int64_t tail = start[B];
      pos.resize(N);
      ids_by_bag.resize(N);
      if (weighted) psw_by_bag.resize(N);
      for (int64_t p = 0; p < N; ++p) {
        const int64_t j = bd[p] >= 0 && bd[p] < B ? next[bd[p]]++ : tail++;
        pos[j] = p;
        ids_by_bag[j] = id_data[p];
        if (weighted) psw_by_bag[j] = psw_data[p];
      }
      id_data = ids_by_bag.data();
      if (weighted) psw_data = psw_by_bag.data();
    }
  } else {  // offsets [K]: bag k starts at the k-th smallest offset in [0, N] (as segment ids do)
    std::vector<int64_t> offs;
    offs.reserve(K);
    for (int64_t k = 0; k < K; ++k) {
      if (bd[k] >= 0 && bd[k] <= N) offs.push_back(bd[k]);
    }
    std::sort(offs.begin(), offs.end());
    for (int64_t b = 0; b <= B && b < static_cast<int64_t>(offs.size()); ++b) start[b] = offs[b];
  }
  Args a{weight.typed_data(), wd[0], wd[1], id_data, psw_data,
         N, B, mode, padding_idx, start.data(), out->typed_data(), arg->typed_data()};
  if (B == 0) return ffi::Error::Success();
  BagRanges(pool, a);
  if (mode == kMax && !pos.empty()) {  // arg-max positions back to the caller's order
    int32_t* g = arg->typed_data();
    for (int64_t k = 0; k < B * a.D; ++k) {
      if (g[k] < N) g[k] = static_cast<int32_t>(pos[g[k]]);
    }
  }
  return ffi::Error::Success();
}

// ---- sparse training: row gradients and fused row-wise optimisers -----------------------------

// Runs body(u) for u in [0, U) on XLA's intra-op pool (rows are distinct: no races).
template <typename F>
void ParallelRows(ffi::ThreadPool& pool, int64_t U, int64_t D, F body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = U * D < (int64_t{1} << 16) ? 1 : 4 * threads;
  ParallelRanges(pool, U, chunks, [body](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) body(u);
  });
}

// grads[U, D] = sum over positions n with slot[n] < U of coef[n] * ct[seg[n]] (sum/mean/sqrtn), or
// for max: grads[slot[arg[b, d]], d] += ct[b, d]. Sum/mean/sqrtn are split over the pool by slot
// ranges: each range scans every position (ints) and adds only into its own slots, in position
// order, so every slot's sum is the one a single thread computes (no races, the same rounding).
ffi::Error RowsGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> ct, ffi::Buffer<ffi::S32> slot,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> arg,
                    ffi::ResultBuffer<ffi::F32> grads, int64_t is_max) {
  const auto cd = ct.dimensions();
  const auto gd = grads->dimensions();
  if (cd.size() != 2 || gd.size() != 2 || cd[1] != gd[1]) {
    return ffi::Error::InvalidArgument("jaxbag rows_grad: ct must be [B, D] and grads [U, D]");
  }
  const int64_t B = cd[0], D = cd[1], U = gd[0];
  const int64_t N = static_cast<int64_t>(slot.element_count());
  float* g = grads->typed_data();
  const float* c = ct.typed_data();
  const int32_t* sl = slot.typed_data();
  if (is_max && static_cast<int64_t>(arg.element_count()) != B * D) {
    return ffi::Error::InvalidArgument("jaxbag rows_grad: max needs arg [B, D]");
  }
  if (!is_max && (static_cast<int64_t>(seg.element_count()) != N ||
                  static_cast<int64_t>(coef.element_count()) != N)) {
    return ffi::Error::InvalidArgument("jaxbag rows_grad: slot, seg and coef must all be [N]");
  }
  const int32_t* a = arg.typed_data();
  const int32_t* sg = seg.typed_data();
  const float* w = coef.typed_data();
  auto range = [=](int64_t u0, int64_t u1) {
    if (u1 > u0) std::memset(g + u0 * D, 0, sizeof(float) * (u1 - u0) * D);
    if (is_max) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t d = 0; d < D; ++d) {
          const int64_t p = a[b * D + d];
          if (p < 0 || p >= N) continue;
          const int64_t u = sl[p];
          if (u < u0 || u >= u1) continue;
          g[u * D + d] += c[b * D + d];
        }
      }
      return;
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t u = sl[n], b = sg[n];
      // (no shortcut for k == 0: 0 * inf and 0 * NaN are NaN, as in the XLA path and torch)
      if (u < u0 || u >= u1 || b < 0 || b >= B) continue;
      const float k = w[n];
      float* gu = g + u * D;
      const float* cb = c + b * D;
      for (int64_t d = 0; d < D; ++d) gu[d] += k * cb[d];
    }
  };
  // Each range reads all N slots and segments: split only when the D-wide adds dwarf that (not
  // for max, one add per arg read).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool split = !is_max && N * D >= (int64_t{1} << 18) && D >= 8 && U >= 2 && threads > 1;
  if (!split) {
    range(0, U);
    return ffi::Error::Success();
  }
  // Slots past the batch's distinct rows are unused (U = min(N, V) by default): zero them here
  // and split only the used ones, so that no range is left with nothing to add.
  int64_t used = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t u = sl[n];
    if (u >= used && u < U) used = u + 1;
  }
  if (used < U) std::memset(g + used * D, 0, sizeof(float) * (U - used) * D);
  ParallelRanges(pool, used, std::min<int64_t>(std::max<int64_t>(used, 1), threads), range);
  return ffi::Error::Success();
}

// Distinct keys < V of keys [N] in increasing order, padded with V to U slots, and each position's
// slot (U for keys >= V and for keys beyond the first U distinct ones). Hash, then LSD radix sort.
ffi::Error UniqueRows(ffi::Buffer<ffi::S32> keys, ffi::ResultBuffer<ffi::S32> rows,
                      ffi::ResultBuffer<ffi::S32> inverse, int64_t num_embeddings) {
  const int64_t N = static_cast<int64_t>(keys.element_count());
  const int64_t U = static_cast<int64_t>(rows->element_count());
  if (static_cast<int64_t>(inverse->element_count()) != N) {
    return ffi::Error::InvalidArgument("jaxbag unique_rows: inverse must be [N]");
  }
  const int32_t* k = keys.typed_data();
  int32_t* out_rows = rows->typed_data();
  int32_t* inv = inverse->typed_data();
  const int32_t V = static_cast<int32_t>(num_embeddings);
  int64_t cap = 16;
  while (cap < 2 * N) cap <<= 1;
  std::vector<int32_t> hkey(cap, -1), hslot(cap);
  std::vector<int32_t> first;  // slot -> key, in first-occurrence order
  first.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    const int32_t key = k[n];
    if (key < 0 || key >= V) { inv[n] = -1; continue; }
    uint64_t h = (static_cast<uint64_t>(static_cast<uint32_t>(key)) * 0x9E3779B97F4A7C15ull) >> 20;
    int64_t i = static_cast<int64_t>(h & (cap - 1));
    while (hkey[i] != -1 && hkey[i] != key) i = (i + 1) & (cap - 1);
    if (hkey[i] == -1) {
      hkey[i] = key;
      hslot[i] = static_cast<int32_t>(first.size());
      first.push_back(key);
    }
    inv[n] = hslot[i];
  }
  const int64_t M = static_cast<int64_t>(first.size());
  // LSD radix sort of (key, first-occurrence slot) by key, 8 bits a pass.
  std::vector<uint32_t> a(M), b(M);
  std::vector<int32_t> ia(M), ib(M);
  for (int64_t j = 0; j < M; ++j) { a[j] = static_cast<uint32_t>(first[j]); ia[j] = static_cast<int32_t>(j); }
  uint32_t maxkey = 0;
  for (int64_t j = 0; j < M; ++j) maxkey = std::max(maxkey, a[j]);
  for (int shift = 0; shift < 32 && (maxkey >> shift) != 0; shift += 8) {
    int64_t count[257] = {0};
    for (int64_t j = 0; j < M; ++j) ++count[((a[j] >> shift) & 255) + 1];
    for (int c = 0; c < 256; ++c) count[c + 1] += count[c];
    for (int64_t j = 0; j < M; ++j) {
      const int64_t dst = count[(a[j] >> shift) & 255]++;
      b[dst] = a[j];
      ib[dst] = ia[j];
    }
    a.swap(b);
    ia.swap(ib);
  }
  std::vector<int32_t> rank(M);
  for (int64_t j = 0; j < M; ++j) rank[ia[j]] = static_cast<int32_t>(j);
  for (int64_t u = 0; u < U; ++u) out_rows[u] = u < M ? static_cast<int32_t>(a[u]) : V;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t s = inv[n];
    inv[n] = (s < 0 || rank[s] >= U) ? static_cast<int32_t>(U) : rank[s];
  }
  return ffi::Error::Success();
}

// Table storage of the row updates: float32, or bfloat16 (its bits, uint16_t), read and written
// through float32. XLA:CPU scatters into a bfloat16 table by converting all of it to float32 and
// back (O(V D) per step); the kernel touches only the rows.
inline float Load(float x) { return x; }
inline float Load(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void Store(float* p, float x) { *p = x; }
inline void Store(uint16_t* p, float x) {  // round to nearest, ties to even (XLA's convert)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    *p = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *p = static_cast<uint16_t>(bits >> 16);
}

// Lazy Adam (torch SparseAdam) on the rows; table, mu, nu are updated in place (aliased).
// hyper = [step_size, b1, 1 - b1, b2, 1 - b2, eps] (1 - b rounded from double, as torch's alpha:
// 1.0f - 0.999f is 1.3e-5 off 0.001f, which scaled every step by 6e-6).
template <ffi::DataType T, ffi::DataType M>
ffi::Error SparseAdam(ffi::ThreadPool pool, ffi::Buffer<T> table, ffi::Buffer<M> mu,
                      ffi::Buffer<M> nu, ffi::Buffer<ffi::S32> rows,
                      ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> hyper,
                      ffi::ResultBuffer<T> table_out, ffi::ResultBuffer<M> mu_out,
                      ffi::ResultBuffer<M> nu_out) {
  using S = ffi::NativeType<T>;
  using SM = ffi::NativeType<M>;
  const auto td = table.dimensions();
  const int64_t V = td[0], D = td[1], U = static_cast<int64_t>(rows.element_count());
  if (static_cast<int64_t>(grads.element_count()) != U * D || hyper.element_count() != 6 ||
      static_cast<int64_t>(mu.element_count()) != V * D ||
      static_cast<int64_t>(nu.element_count()) != V * D) {
    return ffi::Error::InvalidArgument("jaxbag sparse_adam: bad shapes");
  }
  S* w = table_out->typed_data();
  SM* m = mu_out->typed_data();
  SM* v = nu_out->typed_data();
  if (w != table.typed_data()) std::memcpy(w, table.typed_data(), sizeof(S) * V * D);
  if (m != mu.typed_data()) std::memcpy(m, mu.typed_data(), sizeof(SM) * V * D);
  if (v != nu.typed_data()) std::memcpy(v, nu.typed_data(), sizeof(SM) * V * D);
  const float* h = hyper.typed_data();
  const float step = h[0], b1 = h[1], c1 = h[2], b2 = h[3], c2 = h[4], eps = h[5];
  const int32_t* r = rows.typed_data();
  const float* g = grads.typed_data();
  ParallelRows(pool, U, D, [=](int64_t u) {
    if (u + 8 < U) {
      const int64_t nr = r[u + 8];
      if (nr >= 0 && nr < V) {
        for (int64_t off = 0; off < D && off < 256; off += 16) {
          __builtin_prefetch(w + nr * D + off, 1);
          __builtin_prefetch(m + nr * D + off, 1);
          __builtin_prefetch(v + nr * D + off, 1);
        }
      }
    }
    const int64_t row = r[u];
    if (row < 0 || row >= V) return;
    S* wr = w + row * D;
    SM* mr = m + row * D;
    SM* vr = v + row * D;
    const float* gu = g + u * D;
    for (int64_t d = 0; d < D; ++d) {  // (the table takes the moments before their rounding)
      const float gd = gu[d];
      const float mn = Load(mr[d]) * b1 + c1 * gd;
      const float vn = Load(vr[d]) * b2 + c2 * (gd * gd);
      Store(mr + d, mn);
      Store(vr + d, vn);
      Store(wr + d, Load(wr[d]) - step * (mn / (std::sqrt(vn) + eps)));
    }
  });
  return ffi::Error::Success();
}

// fbgemm's row-wise Adagrad; hyper = [lr, eps].
template <ffi::DataType T, ffi::DataType M>
ffi::Error SparseAdagrad(ffi::ThreadPool pool, ffi::Buffer<T> table,
                         ffi::Buffer<M> sum_sq, ffi::Buffer<ffi::S32> rows,
                         ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> hyper,
                         ffi::ResultBuffer<T> table_out,
                         ffi::ResultBuffer<M> sum_sq_out) {
  using S = ffi::NativeType<T>;
  using SM = ffi::NativeType<M>;
  const auto td = table.dimensions();
  const int64_t V = td[0], D = td[1], U = static_cast<int64_t>(rows.element_count());
  if (static_cast<int64_t>(grads.element_count()) != U * D || hyper.element_count() != 2 ||
      static_cast<int64_t>(sum_sq.element_count()) != V) {
    return ffi::Error::InvalidArgument("jaxbag sparse_adagrad: bad shapes");
  }
  S* w = table_out->typed_data();
  SM* a = sum_sq_out->typed_data();
  if (w != table.typed_data()) std::memcpy(w, table.typed_data(), sizeof(S) * V * D);
  if (a != sum_sq.typed_data()) std::memcpy(a, sum_sq.typed_data(), sizeof(SM) * V);
  const float lr = hyper.typed_data()[0], eps = hyper.typed_data()[1];
  const int32_t* r = rows.typed_data();
  const float* g = grads.typed_data();
  ParallelRows(pool, U, D, [=](int64_t u) {
    if (u + 8 < U) {
      const int64_t nr = r[u + 8];
      if (nr >= 0 && nr < V) {
        for (int64_t off = 0; off < D && off < 256; off += 16) __builtin_prefetch(w + nr * D + off, 1);
        __builtin_prefetch(a + nr, 1);
      }
    }
    const int64_t row = r[u];
    if (row < 0 || row >= V) return;
    const float* gu = g + u * D;
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) sq += gu[d] * gu[d];
    const float acc = Load(a[row]) + sq / static_cast<float>(D);
    Store(a + row, acc);  // (the table takes the sum before its rounding)
    const float scale = lr / (std::sqrt(acc) + eps);
    S* wr = w + row * D;
    for (int64_t d = 0; d < D; ++d) Store(wr + d, Load(wr[d]) - scale * gu[d]);
  });
  return ffi::Error::Success();
}

// SGD; hyper = [lr].
template <ffi::DataType T>
ffi::Error SparseSgd(ffi::ThreadPool pool, ffi::Buffer<T> table, ffi::Buffer<ffi::S32> rows,
                     ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> hyper,
                     ffi::ResultBuffer<T> table_out) {
  using S = ffi::NativeType<T>;
  const auto td = table.dimensions();
  const int64_t V = td[0], D = td[1], U = static_cast<int64_t>(rows.element_count());
  if (static_cast<int64_t>(grads.element_count()) != U * D || hyper.element_count() != 1) {
    return ffi::Error::InvalidArgument("jaxbag sparse_sgd: bad shapes");
  }
  S* w = table_out->typed_data();
  if (w != table.typed_data()) std::memcpy(w, table.typed_data(), sizeof(S) * V * D);
  const float lr = hyper.typed_data()[0];
  const int32_t* r = rows.typed_data();
  const float* g = grads.typed_data();
  ParallelRows(pool, U, D, [=](int64_t u) {
    if (u + 8 < U) {
      const int64_t nr = r[u + 8];
      if (nr >= 0 && nr < V) {
        for (int64_t off = 0; off < D && off < 256; off += 16) __builtin_prefetch(w + nr * D + off, 1);
      }
    }
    const int64_t row = r[u];
    if (row < 0 || row >= V) return;
    S* wr = w + row * D;
    const float* gu = g + u * D;
    for (int64_t d = 0; d < D; ++d) Store(wr + d, Load(wr[d]) - lr * gu[d]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagBagFwdF32, BagFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("padding_idx")
                                  .Attr<int64_t>("layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagUniqueRows, UniqueRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_embeddings"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagRowsGradF32, RowsGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("is_max"));

// The row updates: F32 / BF16 tables, with float32 or bfloat16 state (TABLE, STATE).
#define JAXBAG_SPARSE_STATEFUL(SUFFIX, T, M)                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagSparseAdam##SUFFIX, (SparseAdam<T, M>),     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<ffi::Buffer<T>>()                        \
                                    .Arg<ffi::Buffer<M>>()                        \
                                    .Arg<ffi::Buffer<M>>()                        \
                                    .Arg<ffi::Buffer<ffi::S32>>()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Ret<ffi::Buffer<T>>()                        \
                                    .Ret<ffi::Buffer<M>>()                        \
                                    .Ret<ffi::Buffer<M>>());                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagSparseAdagrad##SUFFIX, (SparseAdagrad<T, M>), \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<ffi::Buffer<T>>()                        \
                                    .Arg<ffi::Buffer<M>>()                        \
                                    .Arg<ffi::Buffer<ffi::S32>>()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Ret<ffi::Buffer<T>>()                        \
                                    .Ret<ffi::Buffer<M>>());

#define JAXBAG_SPARSE_SGD(SUFFIX, T)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbagSparseSgd##SUFFIX, SparseSgd<T>,            \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<ffi::Buffer<T>>()                        \
                                    .Arg<ffi::Buffer<ffi::S32>>()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Ret<ffi::Buffer<T>>());

JAXBAG_SPARSE_STATEFUL(F32F32, ffi::F32, ffi::F32)
JAXBAG_SPARSE_STATEFUL(F32BF16, ffi::F32, ffi::BF16)
JAXBAG_SPARSE_STATEFUL(BF16F32, ffi::BF16, ffi::F32)
JAXBAG_SPARSE_STATEFUL(BF16BF16, ffi::BF16, ffi::BF16)
JAXBAG_SPARSE_SGD(F32, ffi::F32)
JAXBAG_SPARSE_SGD(BF16, ffi::BF16)
