// Fused kernels for MindSpore's CPU backend, loaded by mindsft/cpu_kernels.py as MindSpore
// "aot" custom ops. All fp32.
//
// Causal attention, forward and backward in one pass each, so the scores never leave cache
// (MindSpore's CPU kernels write [B, H, S, S] scores, probabilities and their gradients to memory,
// several times over). Queries come already scaled by 1/sqrt(head_dim); key/value heads are
// grouped (query head h reads key/value head h / (H / Hkv)).
//   Forward:  q [B,H,S,D], k [B,Hkv,S,D], v [B,Hkv,S,D] -> out [B,H,S,D], lse [B,H,S]
//   Backward: q, k, v, out, lse, dout -> dq [B,H,S,D], dk [B,Hkv,S,D], dv [B,Hkv,S,D]
// Packed rows (PackedAttention*) take one more input after v, ends [B,K] int32: the cumulative end
// offset of each sample in the row (actual_seq_len). A query attends only to keys of its own
// sample, and a block of queries starts its keys at its first row's sample start, so the cost
// follows the sum of squared sample lengths, not the square of the row.
//
// Cross-entropy per row of logits (see CrossEntropyForward / CrossEntropyBackward).
//
// QLoRA's base weights dequantized (see Dequantize4bit / Dequantize4bitNested / Dequantize8bit).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace {

struct Dims {
  int64_t batch, heads, kv_heads, seq, dim;
};

Dims dims_of(int64_t **shapes) {
  return Dims{shapes[0][0], shapes[0][1], shapes[1][1], shapes[0][2], shapes[0][3]};
}

// Threads per call: MINDSFT_KERNEL_THREADS (the Python side sets MindSpore's runtime thread
// count there), else the machine's cores.
int64_t thread_budget() {
  static const int64_t budget = [] {
    const char *env = std::getenv("MINDSFT_KERNEL_THREADS");
    const int64_t asked = env ? std::atoll(env) : 0;
    return asked > 0 ? asked : std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return budget;
}

// Runs body(task) for task in [0, count) on up to thread_budget() threads, dealt out in turn.
template <typename Body>
void parallel_for(int64_t count, Body body) {
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(count, thread_budget()));
  if (threads == 1) {
    for (int64_t t = 0; t < count; t++) body(t);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < threads; w++) {
    pool.emplace_back([=, &body]() {
      for (int64_t t = w; t < count; t += threads) body(t);
    });
  }
  for (auto &thread : pool) thread.join();
}

// dst[d][j] = src[j][d]: a [seq, dim] block by columns, so products against all keys run over
// contiguous j.
void transpose(const float *src, float *dst, int64_t seq, int64_t dim, int64_t padded) {
  for (int64_t j = 0; j < seq; j++)
    for (int64_t d = 0; d < dim; d++) dst[d * padded + j] = src[j * dim + d];
}

constexpr int64_t ROWS = 8;   // query rows per block: their accumulators stay in registers
constexpr int64_t LANES = 16;  // key columns per inner step (one AVX-512 vector of fp32)

// s[r][j] = sum_d x[r][d] * cols[d][j] for ROWS rows of x (row stride dim) and j < width (a
// multiple of LANES); cols and s both have row stride `stride`.
void rows_times_columns(const float *x, int64_t rows, const float *cols, float *s, int64_t width, int64_t stride,
                        int64_t dim) {
  for (int64_t j0 = 0; j0 < width; j0 += LANES) {
    float acc[ROWS][LANES] = {};
    for (int64_t d = 0; d < dim; d++) {
      const float *col = cols + d * stride + j0;
      for (int64_t r = 0; r < ROWS; r++) {
        const float xr = r < rows ? x[r * dim + d] : 0.0f;
        for (int64_t l = 0; l < LANES; l++) acc[r][l] += xr * col[l];
      }
    }
    for (int64_t r = 0; r < rows; r++)
      for (int64_t l = 0; l < LANES; l++) s[r * stride + j0 + l] = acc[r][l];
  }
}

// out[r][:] = sum_{j < width} w[r][j] * m[j][:] for ROWS rows; m is [seq, dim] row-major.
template <int64_t DIM>
void weights_times_rows(const float *w, int64_t rows, int64_t stride, const float *m, int64_t width, float *out) {
  float acc[ROWS][DIM] = {};
  for (int64_t j = 0; j < width; j++) {
    const float *mj = m + j * DIM;
    for (int64_t r = 0; r < ROWS; r++) {
      const float wr = r < rows ? w[r * stride + j] : 0.0f;
      for (int64_t d = 0; d < DIM; d++) acc[r][d] += wr * mj[d];
    }
  }
  for (int64_t r = 0; r < rows; r++)
    for (int64_t d = 0; d < DIM; d++) out[r * DIM + d] = acc[r][d];
}

// out[j][:] += sum_r w[r][j] * x[r][:] for j < width: the transpose product (dk, dv).
template <int64_t DIM>
void columns_times_rows(const float *w, int64_t rows, int64_t stride, const float *x, int64_t width, float *out) {
  for (int64_t j = 0; j < width; j++) {
    float acc[DIM] = {};
    for (int64_t r = 0; r < rows; r++) {
      const float wr = w[r * stride + j];
      const float *xr = x + r * DIM;
      for (int64_t d = 0; d < DIM; d++) acc[d] += wr * xr[d];
    }
    float *oj = out + j * DIM;
    for (int64_t d = 0; d < DIM; d++) oj[d] += acc[d];
  }
}

// Boundaries of packed rows: ends [batch, count] (nullptr: one sample per row).
struct Ends {
  const int32_t *ends = nullptr;
  int64_t count = 0;
};

// start[i] = first position of the sample holding position i in row b (the largest end <= i).
std::vector<int64_t> sample_starts(const Ends &e, int64_t b, int64_t seq) {
  std::vector<int64_t> start(seq, 0);
  if (e.ends == nullptr) return start;
  const int32_t *row = e.ends + b * e.count;
  int64_t current = 0, next = 0;
  for (int64_t i = 0; i < seq; i++) {
    while (next < e.count && row[next] <= i) current = std::max<int64_t>(current, row[next++]);
    start[i] = current;
  }
  return start;
}

template <int64_t D>
void forward(const Dims &n, const Ends &e, const float *q, const float *k, const float *v, float *out, float *lse) {
  const int64_t rep = n.heads / n.kv_heads, S = n.seq;
  const int64_t padded = (S + LANES - 1) / LANES * LANES;
  parallel_for(n.batch * n.kv_heads, [&](int64_t task) {
    const int64_t b = task / n.kv_heads, g = task % n.kv_heads;
    const std::vector<int64_t> start = sample_starts(e, b, S);
    const float *kb = k + (b * n.kv_heads + g) * S * D;
    const float *vb = v + (b * n.kv_heads + g) * S * D;
    std::vector<float> kt(D * padded, 0.0f), p(ROWS * padded);
    transpose(kb, kt.data(), S, D, padded);
    for (int64_t r = 0; r < rep; r++) {
      const int64_t h = g * rep + r;
      const float *qh = q + (b * n.heads + h) * S * D;
      float *oh = out + (b * n.heads + h) * S * D;
      float *lh = lse + (b * n.heads + h) * S;
      for (int64_t i0 = 0; i0 < S; i0 += ROWS) {
        const int64_t rows = std::min(ROWS, S - i0);
        const int64_t width = std::min(padded, (i0 + rows + LANES - 1) / LANES * LANES);
        // Keys from the block's first sample start (rounded down to a vector edge); starts only grow.
        const int64_t c0 = start[i0] / LANES * LANES;
        rows_times_columns(qh + i0 * D, rows, kt.data() + c0, p.data() + c0, width - c0, padded, D);
        for (int64_t row = 0; row < rows; row++) {
          const int64_t i = i0 + row, s = start[i];
          float *pr = p.data() + row * padded;
          float top = pr[s];
          for (int64_t j = s + 1; j <= i; j++) top = std::max(top, pr[j]);
          float total = 0.0f;
          for (int64_t j = s; j <= i; j++) {
            pr[j] = std::exp(pr[j] - top);
            total += pr[j];
          }
          const float inverse = 1.0f / total;
          for (int64_t j = s; j <= i; j++) pr[j] *= inverse;
          std::fill(pr + c0, pr + s, 0.0f);
          std::fill(pr + i + 1, pr + width, 0.0f);
          lh[i] = top + std::log(total);
        }
        weights_times_rows<D>(p.data() + c0, rows, padded, vb + c0 * D, std::min(width, S) - c0, oh + i0 * D);
      }
    }
  });
}

template <int64_t D>
void backward(const Dims &n, const Ends &e, const float *q, const float *k, const float *v, const float *out,
              const float *lse, const float *dout, float *dq, float *dk, float *dv) {
  const int64_t rep = n.heads / n.kv_heads, S = n.seq;
  const int64_t padded = (S + LANES - 1) / LANES * LANES;
  // One task per key/value head: the query heads sharing it add into its dk/dv without races.
  parallel_for(n.batch * n.kv_heads, [&](int64_t task) {
    const int64_t b = task / n.kv_heads, g = task % n.kv_heads;
    const int64_t kv_offset = (b * n.kv_heads + g) * S * D;
    const float *kb = k + kv_offset, *vb = v + kv_offset;
    float *dkb = dk + kv_offset, *dvb = dv + kv_offset;
    const std::vector<int64_t> start = sample_starts(e, b, S);
    std::fill(dkb, dkb + S * D, 0.0f);
    std::fill(dvb, dvb + S * D, 0.0f);
    std::vector<float> kt(D * padded, 0.0f), vt(D * padded, 0.0f), p(ROWS * padded), ds(ROWS * padded);
    transpose(kb, kt.data(), S, D, padded);
    transpose(vb, vt.data(), S, D, padded);
    for (int64_t r = 0; r < rep; r++) {
      const int64_t h = g * rep + r;
      const int64_t offset = (b * n.heads + h) * S * D;
      const float *qh = q + offset, *oh = out + offset, *doh = dout + offset;
      const float *lh = lse + (b * n.heads + h) * S;
      float *dqh = dq + offset;
      for (int64_t i0 = 0; i0 < S; i0 += ROWS) {
        const int64_t rows = std::min(ROWS, S - i0);
        const int64_t width = std::min(padded, (i0 + rows + LANES - 1) / LANES * LANES);
        const int64_t c0 = start[i0] / LANES * LANES;
        rows_times_columns(qh + i0 * D, rows, kt.data() + c0, p.data() + c0, width - c0, padded, D);
        rows_times_columns(doh + i0 * D, rows, vt.data() + c0, ds.data() + c0, width - c0, padded, D);
        for (int64_t row = 0; row < rows; row++) {
          const int64_t i = i0 + row, s = start[i];
          float *pr = p.data() + row * padded, *dsr = ds.data() + row * padded;
          const float *doi = doh + i * D, *oi = oh + i * D;
          float dot = 0.0f;  // sum_d dout_i * out_i = sum_j p_ij * dp_ij
          for (int64_t d = 0; d < D; d++) dot += doi[d] * oi[d];
          for (int64_t j = s; j <= i; j++) {
            pr[j] = std::exp(pr[j] - lh[i]);
            dsr[j] = pr[j] * (dsr[j] - dot);
          }
          std::fill(pr + c0, pr + s, 0.0f);
          std::fill(dsr + c0, dsr + s, 0.0f);
          std::fill(pr + i + 1, pr + width, 0.0f);
          std::fill(dsr + i + 1, dsr + width, 0.0f);
        }
        const int64_t keys = std::min(width, S) - c0;
        weights_times_rows<D>(ds.data() + c0, rows, padded, kb + c0 * D, keys, dqh + i0 * D);
        columns_times_rows<D>(ds.data() + c0, rows, padded, qh + i0 * D, keys, dkb + c0 * D);
        columns_times_rows<D>(p.data() + c0, rows, padded, doh + i0 * D, keys, dvb + c0 * D);
      }
    }
  });
}

}  // namespace

#define MINDSFT_HEAD_DIMS(X) X(32) X(64) X(128)

extern "C" int CausalAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  if (nparam != 5) return 1;
  const Dims n = dims_of(shapes);
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  float *lse = static_cast<float *>(params[4]);
#define MINDSFT_FORWARD(DIM) \
  if (n.dim == DIM) {        \
    forward<DIM>(n, Ends{}, q, k, v, out, lse); \
    return 0;                \
  }
  MINDSFT_HEAD_DIMS(MINDSFT_FORWARD)
  return 2;  // a head size the Python side does not route here
}

extern "C" int CausalAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                       void *stream, void *extra) {
  if (nparam != 9) return 1;
  const Dims n = dims_of(shapes);
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *out = static_cast<const float *>(params[3]);
  const float *lse = static_cast<const float *>(params[4]);
  const float *dout = static_cast<const float *>(params[5]);
#define MINDSFT_BACKWARD(DIM) \
  if (n.dim == DIM) {         \
    backward<DIM>(n, Ends{}, q, k, v, out, lse, dout, static_cast<float *>(params[6]),                      \
                  static_cast<float *>(params[7]), static_cast<float *>(params[8]));                        \
    return 0;                 \
  }
  MINDSFT_HEAD_DIMS(MINDSFT_BACKWARD)
  return 2;
}

extern "C" int PackedAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  if (nparam != 6) return 1;
  const Dims n = dims_of(shapes);
  const Ends e{static_cast<const int32_t *>(params[3]), shapes[3][1]};
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[4]);
  float *lse = static_cast<float *>(params[5]);
#define MINDSFT_PACKED_FORWARD(DIM) \
  if (n.dim == DIM) {               \
    forward<DIM>(n, e, q, k, v, out, lse); \
    return 0;                       \
  }
  MINDSFT_HEAD_DIMS(MINDSFT_PACKED_FORWARD)
  return 2;
}

// Inputs q, k, v, ends, out, lse, dout; outputs dq, dk, dv.
extern "C" int PackedAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                       void *stream, void *extra) {
  if (nparam != 10) return 1;
  const Dims n = dims_of(shapes);
  const Ends e{static_cast<const int32_t *>(params[3]), shapes[3][1]};
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *out = static_cast<const float *>(params[4]);
  const float *lse = static_cast<const float *>(params[5]);
  const float *dout = static_cast<const float *>(params[6]);
#define MINDSFT_PACKED_BACKWARD(DIM) \
  if (n.dim == DIM) {                \
    backward<DIM>(n, e, q, k, v, out, lse, dout, static_cast<float *>(params[7]),                           \
                  static_cast<float *>(params[8]), static_cast<float *>(params[9]));                        \
    return 0;                        \
  }
  MINDSFT_HEAD_DIMS(MINDSFT_PACKED_BACKWARD)
  return 2;
}

// Cross-entropy of each row of logits [N, V] against targets [N] (int32; negative = not learned):
// loss [N] (0 where not learned) and the row's log-sum-exp [N], in one read of the logits.
extern "C" int CrossEntropyForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t rows = shapes[0][0], vocab = shapes[0][1];
  const float *logits = static_cast<const float *>(params[0]);
  const int32_t *targets = static_cast<const int32_t *>(params[1]);
  float *loss = static_cast<float *>(params[2]);
  float *lse = static_cast<float *>(params[3]);
  parallel_for(rows, [&](int64_t i) {
    const float *x = logits + i * vocab;
    float top = x[0];
    for (int64_t j = 1; j < vocab; j++) top = std::max(top, x[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < vocab; j++) total += std::exp(x[j] - top);
    lse[i] = top + std::log(total);
    const int32_t t = targets[i];
    loss[i] = (t >= 0 && t < vocab) ? lse[i] - x[t] : 0.0f;
  });
  return 0;
}

// dlogits[i][j] = dloss[i] * (softmax(logits[i])[j] - [j == target]) for learned rows, else 0.
extern "C" int CrossEntropyBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  if (nparam != 5) return 1;
  const int64_t rows = shapes[0][0], vocab = shapes[0][1];
  const float *logits = static_cast<const float *>(params[0]);
  const int32_t *targets = static_cast<const int32_t *>(params[1]);
  const float *lse = static_cast<const float *>(params[2]);
  const float *dloss = static_cast<const float *>(params[3]);
  float *dlogits = static_cast<float *>(params[4]);
  parallel_for(rows, [&](int64_t i) {
    const float *x = logits + i * vocab;
    float *dx = dlogits + i * vocab;
    const int32_t t = targets[i];
    if (t < 0 || t >= vocab) {
      std::fill(dx, dx + vocab, 0.0f);
      return;
    }
    const float g = dloss[i], shift = lse[i];
    for (int64_t j = 0; j < vocab; j++) dx[j] = g * std::exp(x[j] - shift);
    dx[t] -= g;
  });
  return 0;
}

// MindFormers' AdamWeightDecay step for one parameter (fp32, no bias correction), reading each of
// param, m, v and grad once: next_m = b1 m + (1 - b1) g; next_v = b2 v + (1 - b2) g^2;
// next_param = param - lr (next_m / (sqrt(next_v) + eps) + decay param), with g = grad * scale.
// hyper = [lr, scale, beta1, beta2, eps, decay]. Outputs next_param, next_m, next_v.
extern "C" int AdamWeightDecayStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  if (nparam != 8) return 1;
  int64_t size = 1;
  for (int i = 0; i < ndims[0]; i++) size *= shapes[0][i];
  const float *param = static_cast<const float *>(params[0]);
  const float *m = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *grad = static_cast<const float *>(params[3]);
  const float *hyper = static_cast<const float *>(params[4]);
  float *next_param = static_cast<float *>(params[5]);
  float *next_m = static_cast<float *>(params[6]);
  float *next_v = static_cast<float *>(params[7]);
  const float lr = hyper[0], scale = hyper[1], beta1 = hyper[2], beta2 = hyper[3], eps = hyper[4], decay = hyper[5];
  constexpr int64_t CHUNK = 1 << 16;
  const int64_t chunks = (size + CHUNK - 1) / CHUNK;
  parallel_for(chunks, [&](int64_t c) {
    const int64_t end = std::min(size, (c + 1) * CHUNK);
    for (int64_t i = c * CHUNK; i < end; i++) {
      const float g = grad[i] * scale;
      const float mi = beta1 * m[i] + (1.0f - beta1) * g;
      const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
      const float update = mi / (std::sqrt(vi) + eps) + decay * param[i];
      next_param[i] = param[i] - lr * update;
      next_m[i] = mi;
      next_v[i] = vi;
    }
  });
  return 0;
}

// QLoRA's frozen base, dequantized one projection at a time (bitsandbytes' layouts, see
// mindsft/quant.py). The last input of each is not read: it is an activation the result must wait
// for, so that MindSpore's runtime does not dequantize every layer as soon as the step starts
// (their inputs are all parameters) and hold them all.
//
namespace {

// One 4-bit block's scale: nested code · nested absmax + offset, rounded after the product as
// bitsandbytes rounds it (volatile: no fused multiply-add under -ffast-math).
float block_scale(const uint8_t *absmax_codes, const float *nested, const float *offset, const float *dynamic_code,
                  int64_t block) {
  volatile float product = dynamic_code[absmax_codes[block]] * nested[block / 256];
  return product + offset[0];
}

// packed [blocks, blocksize / 2] uint8 (first value in the high nibble), absmax [blocks] fp32,
// code [16] fp32, after -> weight with `out` x `in` values (the last block may be short).
template <typename ScaleOf>
void dequantize_4bit(const uint8_t *packed, int64_t blocks, int64_t blocksize, int64_t numel, const float *code,
                     float *weight, ScaleOf scale_of) {
  constexpr int64_t GROUP = 256;  // blocks per task
  parallel_for((blocks + GROUP - 1) / GROUP, [&](int64_t task) {
    const int64_t last = std::min(blocks, (task + 1) * GROUP);
    for (int64_t b = task * GROUP; b < last; b++) {
      const float scale = scale_of(b);
      const uint8_t *bytes = packed + b * (blocksize / 2);
      const int64_t start = b * blocksize, count = std::min(blocksize, numel - start);
      float *out = weight + start;
      for (int64_t i = 0; i + 1 < count; i += 2) {
        out[i] = code[bytes[i / 2] >> 4] * scale;
        out[i + 1] = code[bytes[i / 2] & 0x0F] * scale;
      }
      if (count % 2) out[count - 1] = code[bytes[count / 2] >> 4] * scale;
    }
  });
}

int64_t numel_of(int ndims, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndims; i++) n *= shape[i];
  return n;
}

}  // namespace

// packed, absmax [blocks, 1] fp32, code [16], after -> weight [out, in]
extern "C" int Dequantize4bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 5) return 1;
  const int64_t blocks = shapes[0][0], blocksize = 2 * shapes[0][1];
  const float *absmax = static_cast<const float *>(params[1]);
  dequantize_4bit(static_cast<const uint8_t *>(params[0]), blocks, blocksize, numel_of(ndims[4], shapes[4]),
                  static_cast<const float *>(params[2]), static_cast<float *>(params[4]),
                  [absmax](int64_t b) { return absmax[b]; });
  return 0;
}

// packed, absmax codes [nested blocks, 256] uint8, nested absmax [nested blocks, 1] fp32,
// offset [1] fp32, dynamic code [256] fp32, code [16], after -> weight [out, in]
extern "C" int Dequantize4bitNested(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  if (nparam != 8) return 1;
  const int64_t blocks = shapes[0][0], blocksize = 2 * shapes[0][1];
  const uint8_t *absmax_codes = static_cast<const uint8_t *>(params[1]);
  const float *nested = static_cast<const float *>(params[2]);
  const float *offset = static_cast<const float *>(params[3]);
  const float *dynamic_code = static_cast<const float *>(params[4]);
  dequantize_4bit(static_cast<const uint8_t *>(params[0]), blocks, blocksize, numel_of(ndims[7], shapes[7]),
                  static_cast<const float *>(params[5]), static_cast<float *>(params[7]),
                  [=](int64_t b) { return block_scale(absmax_codes, nested, offset, dynamic_code, b); });
  return 0;
}

// codes [out, in] int8, row absmax SCB [out, 1] fp32, after -> weight [out, in] = codes · (SCB · 1/127)
extern "C" int Dequantize8bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t rows = shapes[0][0], cols = shapes[0][1];
  const int8_t *codes = static_cast<const int8_t *>(params[0]);
  const float *row_absmax = static_cast<const float *>(params[1]);
  float *weight = static_cast<float *>(params[3]);
  parallel_for(rows, [&](int64_t r) {
    volatile float scale_product = row_absmax[r] * (1.0f / 127.0f);
    const float scale = scale_product;
    for (int64_t c = 0; c < cols; c++) weight[r * cols + c] = static_cast<float>(codes[r * cols + c]) * scale;
  });
  return 0;
}

// A linear layer over a few rows, as a decode step runs it: y [M, N] = x [M, K] · w [N, K]ᵀ.
// MindSpore's CPU MatMul repacks w on every call, which at a handful of rows costs several
// times the product itself (measured at one row: 0.3 ms for a 1365 x 512 weight against torch's
// 0.03 ms, 4 ms for a 32000 x 512 head against 1.2 ms); here w is read once, in place, four of
// its rows at a time against every row of x.
namespace {

// Threads that outlive a call. A decode step runs ~30 of these products, each worth tens of
// microseconds; starting threads per call (parallel_for) cost about as much as the product
// (measured: 0.3 ms for a 1365 x 512 weight, against 0.13 ms with this pool). Idle workers spin a
// little before sleeping, since the next product of a step comes within a fraction of a millisecond.
class WorkerPool {
 public:
  explicit WorkerPool(int64_t workers) {
    for (int64_t w = 0; w < workers; w++) std::thread([this] { work(); }).detach();
    workers_ = workers;
  }

  // Runs task(context, t) for t in [0, count) on the workers and the calling thread. A call that
  // finds the pool busy (MindSpore may launch two kernels at once) runs its tasks alone.
  void run(int64_t count, void (*task)(void *, int64_t), void *context) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || workers_ == 0 || count < 2) {
      for (int64_t t = 0; t < count; t++) task(context, t);
      return;
    }
    task_ = task;
    context_ = context;
    count_ = count;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(workers_, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(wake_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wakeup_.notify_all();
    take_tasks();
    while (pending_.load(std::memory_order_acquire) != 0) {
    }
  }

 private:
  void take_tasks() {
    for (int64_t t = next_.fetch_add(1, std::memory_order_relaxed); t < count_;
         t = next_.fetch_add(1, std::memory_order_relaxed))
      task_(context_, t);
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      // 100 us measured best on 2 cores: longer spins slow MindSpore's own small ops between
      // the products (its threads want this core), shorter ones pay the wake-up on most calls.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      int64_t spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(wake_);
          wakeup_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      take_tasks();
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  int64_t workers_ = 0;
  std::mutex busy_, wake_;
  std::condition_variable wakeup_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0}, pending_{0};
  void (*task_)(void *, int64_t) = nullptr;
  void *context_ = nullptr;
  int64_t count_ = 0;
};

WorkerPool &worker_pool() {
  // Never destroyed: its detached workers may still be waiting when the process exits.
  static WorkerPool *pool = new WorkerPool(thread_budget() - 1);
  return *pool;
}

constexpr int64_t WEIGHT_ROWS = 4;
constexpr int64_t WEIGHT_ROWS_PER_TASK = 64;
constexpr int64_t WIDTH = 16;  // floats per vector (GCC lowers it to what the CPU has)
typedef float Vector __attribute__((vector_size(WIDTH * sizeof(float))));

inline Vector load(const float *p) {
  Vector v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float lanes_sum(Vector v) {
  float total = 0.0f;
  for (int64_t l = 0; l < WIDTH; l++) total += v[l];
  return total;
}

// y[m][n..n+4) for M rows of x: every loaded vector of w meets every row of x, so w is read once
// and the products stay in registers (M x 4 accumulators).
template <int64_t M>
void rows_by_weight_rows(const float *x, const float *w, int64_t n, int64_t K, int64_t N, float *y) {
  Vector acc[M][WEIGHT_ROWS] = {};
  const float *wr = w + n * K;
  int64_t k = 0;
  for (; k + WIDTH <= K; k += WIDTH) {
    Vector wv[WEIGHT_ROWS];
    for (int64_t j = 0; j < WEIGHT_ROWS; j++) wv[j] = load(wr + j * K + k);
    for (int64_t m = 0; m < M; m++) {
      const Vector xv = load(x + m * K + k);
      for (int64_t j = 0; j < WEIGHT_ROWS; j++) acc[m][j] += xv * wv[j];
    }
  }
  for (int64_t m = 0; m < M; m++)
    for (int64_t j = 0; j < WEIGHT_ROWS; j++) {
      float total = lanes_sum(acc[m][j]);
      for (int64_t t = k; t < K; t++) total += x[m * K + t] * wr[j * K + t];
      y[m * N + n + j] = total;
    }
}

template <int64_t M>
void rows_by_weight_row(const float *x, const float *w, int64_t n, int64_t K, int64_t N, float *y) {
  Vector acc[M] = {};
  const float *wn = w + n * K;
  int64_t k = 0;
  for (; k + WIDTH <= K; k += WIDTH) {
    const Vector wv = load(wn + k);
    for (int64_t m = 0; m < M; m++) acc[m] += load(x + m * K + k) * wv;
  }
  for (int64_t m = 0; m < M; m++) {
    float total = lanes_sum(acc[m]);
    for (int64_t t = k; t < K; t++) total += x[m * K + t] * wn[t];
    y[m * N + n] = total;
  }
}

template <int64_t M>
void few_rows_block(const float *x, const float *w, int64_t n0, int64_t n1, int64_t K, int64_t N, float *y) {
  int64_t n = n0;
  for (; n + WEIGHT_ROWS <= n1; n += WEIGHT_ROWS) rows_by_weight_rows<M>(x, w, n, K, N, y);
  for (; n < n1; n++) rows_by_weight_row<M>(x, w, n, K, N, y);
}

// Rows of x in groups of up to four (M x 4 accumulators fit the registers).
void few_rows_product(const float *x, int64_t rows, const float *w, int64_t n0, int64_t n1, int64_t K, int64_t N,
                      float *y) {
  for (int64_t m = 0; m < rows; m += 4) {
    const float *xm = x + m * K;
    float *ym = y + m * N;
    switch (std::min<int64_t>(4, rows - m)) {
      case 1: few_rows_block<1>(xm, w, n0, n1, K, N, ym); break;
      case 2: few_rows_block<2>(xm, w, n0, n1, K, N, ym); break;
      case 3: few_rows_block<3>(xm, w, n0, n1, K, N, ym); break;
      default: few_rows_block<4>(xm, w, n0, n1, K, N, ym); break;
    }
  }
}

}  // namespace

// x [M, K], w [N, K] -> y [M, N] (fp32)
extern "C" int FewRowsLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 3) return 1;
  const int64_t rows = shapes[0][0], K = shapes[0][1], N = shapes[1][0];
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t tasks = (N + WEIGHT_ROWS_PER_TASK - 1) / WEIGHT_ROWS_PER_TASK;
  auto body = [&](int64_t task) {
    const int64_t n0 = task * WEIGHT_ROWS_PER_TASK;
    few_rows_product(x, rows, w, n0, std::min(N, n0 + WEIGHT_ROWS_PER_TASK), K, N, y);
  };
  worker_pool().run(tasks, [](void *context, int64_t task) { (*static_cast<decltype(body) *>(context))(task); },
                    &body);
  return 0;
}

namespace {

// The best K continuations of one beam-search row by (total desc, token asc), where
// total = float(log_softmax(logits)[t]) + score computed as the host did: float32 shift by the
// max, log-sum-exp in double.
void beam_row_top_k(const float *logits, int64_t vocab, float score, int64_t K, float *totals, int32_t *tokens) {
  float peak = logits[0];
  for (int64_t t = 1; t < vocab; t++) peak = std::max(peak, logits[t]);
  double sum = 0.0;
  for (int64_t t = 0; t < vocab; t++) sum += std::exp(static_cast<double>(logits[t] - peak));
  const double lse = std::log(sum);
  int64_t kept = 0;
  for (int64_t t = 0; t < vocab; t++) {
    const float total = static_cast<float>(static_cast<double>(logits[t] - peak) - lse) + score;
    // Tokens come in ascending order, so an equal total never displaces an earlier token.
    if (kept == K && !(total > totals[K - 1])) continue;
    int64_t at = kept == K ? K - 1 : kept++;
    for (; at > 0 && total > totals[at - 1]; at--) {
      totals[at] = totals[at - 1];
      tokens[at] = tokens[at - 1];
    }
    totals[at] = total;
    tokens[at] = static_cast<int32_t>(t);
  }
}

}  // namespace

// logits [R, V], scores [R] -> totals [R, K] (float32), tokens [R, K] (int32), best first.
extern "C" int BeamTopK(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t rows = shapes[0][0], vocab = shapes[0][1], K = shapes[2][1];
  if (K > vocab) return 1;
  const float *logits = static_cast<const float *>(params[0]);
  const float *scores = static_cast<const float *>(params[1]);
  float *totals = static_cast<float *>(params[2]);
  int32_t *tokens = static_cast<int32_t *>(params[3]);
  auto body = [&](int64_t r) {
    beam_row_top_k(logits + r * vocab, vocab, scores[r], K, totals + r * K, tokens + r * K);
  };
  worker_pool().run(rows, [](void *context, int64_t task) { (*static_cast<decltype(body) *>(context))(task); },
                    &body);
  return 0;
}

// One decode step of attention for every row: rotate the new query and key (half-split rotary),
// take each row's cache from the row it continues (beam search reorders rows; greedy passes
// r -> r), write the new key/value at `slot`, and attend over the whole cache with an additive
// mask. Inputs: q [R, H*D], k, v [R, Hkv*D], cos, sin [R, D], mask [R, T], slot [1] int32,
// rows [R] int32, key_cache, value_cache [R, Hkv, T, D]; outputs: out [R, H*D], new key_cache,
// new value_cache. One task per (row, key/value head); its n_rep query heads share the cache.
extern "C" int DecodeAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 13) return 1;
  const int64_t R = shapes[8][0], kv_heads = shapes[8][1], T = shapes[8][2], D = shapes[8][3];
  const int64_t heads = shapes[0][1] / D, n_rep = heads / kv_heads, half = D / 2;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *cos = static_cast<const float *>(params[3]);
  const float *sin = static_cast<const float *>(params[4]);
  const float *mask = static_cast<const float *>(params[5]);
  const int64_t slot = static_cast<const int32_t *>(params[6])[0];
  const int32_t *rows = static_cast<const int32_t *>(params[7]);
  const float *key_cache = static_cast<const float *>(params[8]);
  const float *value_cache = static_cast<const float *>(params[9]);
  float *out = static_cast<float *>(params[10]);
  float *new_keys = static_cast<float *>(params[11]);
  float *new_values = static_cast<float *>(params[12]);
  if (slot < 0 || slot >= T || heads % kv_heads != 0 || D % 2 != 0) return 1;
  for (int64_t r = 0; r < R; r++)
    if (rows[r] < 0 || rows[r] >= R) return 1;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));

  auto rotate = [&](const float *x, const float *c, const float *s, float factor, float *y) {
    for (int64_t i = 0; i < half; i++) y[i] = (x[i] * c[i] - x[i + half] * s[i]) * factor;
    for (int64_t i = half; i < D; i++) y[i] = (x[i] * c[i] + x[i - half] * s[i]) * factor;
  };
  auto body = [&](int64_t task) {
    const int64_t r = task / kv_heads, g = task % kv_heads;
    const int64_t block = T * D, from = (static_cast<int64_t>(rows[r]) * kv_heads + g) * block;
    float *keys = new_keys + (r * kv_heads + g) * block;
    float *values = new_values + (r * kv_heads + g) * block;
    std::copy(key_cache + from, key_cache + from + block, keys);
    std::copy(value_cache + from, value_cache + from + block, values);
    const float *c = cos + r * D, *s = sin + r * D;
    rotate(k + (r * kv_heads + g) * D, c, s, 1.0f, keys + slot * D);
    std::copy(v + (r * kv_heads + g) * D, v + (r * kv_heads + g + 1) * D, values + slot * D);
    std::vector<float> query(D), scores(T);
    for (int64_t h = g * n_rep; h < (g + 1) * n_rep; h++) {
      rotate(q + (r * heads + h) * D, c, s, scale, query.data());
      float peak = -INFINITY;
      for (int64_t t = 0; t < T; t++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += query[d] * keys[t * D + d];
        scores[t] = dot + mask[r * T + t];
        peak = std::max(peak, scores[t]);
      }
      float total = 0.0f;
      for (int64_t t = 0; t < T; t++) total += (scores[t] = std::exp(scores[t] - peak));
      float *o = out + (r * heads + h) * D;
      std::fill(o, o + D, 0.0f);
      for (int64_t t = 0; t < T; t++) {
        const float p = scores[t] / total;
        for (int64_t d = 0; d < D; d++) o[d] += p * values[t * D + d];
      }
    }
  };
  worker_pool().run(R * kv_heads,
                    [](void *context, int64_t task) { (*static_cast<decltype(body) *>(context))(task); }, &body);
  return 0;
}

// RMSNorm of a decode step's few rows, forward only: x [M, D], weight [D], eps [1] -> y [M, D],
// y = x / sqrt(mean(x^2) + eps) * weight (the mean accumulated in double).
extern "C" int RmsNormRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t D = shapes[0][ndims[0] - 1];
  int64_t M = 1;
  for (int i = 0; i < ndims[0] - 1; i++) M *= shapes[0][i];
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  for (int64_t m = 0; m < M; m++) {
    const float *row = x + m * D;
    double squares = 0.0;
    for (int64_t d = 0; d < D; d++) squares += static_cast<double>(row[d]) * row[d];
    const float scale = 1.0f / std::sqrt(static_cast<float>(squares / D) + eps);
    for (int64_t d = 0; d < D; d++) y[m * D + d] = weight[d] * (row[d] * scale);
  }
  return 0;
}
