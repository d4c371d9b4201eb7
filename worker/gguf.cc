#include "worker/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "worker/half.h"

namespace kvq::worker {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
constexpr int64_t kDefaultAlignment = 32;
constexpr uint64_t kMaxStringLen = 1ull << 30;
constexpr uint64_t kMaxDims = 4;

template <typename T>
T LoadLE(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Bounds-checked cursor; every read fails cleanly past the end.
class Cursor {
 public:
  Cursor(const uint8_t* p, int64_t n) : p_(p), n_(n) {}
  int64_t pos() const { return pos_; }
  bool Skip(uint64_t k) {
    if (k > uint64_t(n_ - pos_)) return false;
    pos_ += int64_t(k);
    return true;
  }
  template <typename T>
  bool Read(T* out) {
    if (n_ - pos_ < int64_t(sizeof(T))) return false;
    *out = LoadLE<T>(p_ + pos_);
    pos_ += sizeof(T);
    return true;
  }
  bool ReadString(std::string* out) {
    uint64_t len;
    if (!Read(&len) || len > kMaxStringLen || len > uint64_t(n_ - pos_)) return false;
    out->assign(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += int64_t(len);
    return true;
  }

 private:
  const uint8_t* p_;
  int64_t n_;
  int64_t pos_ = 0;
};

int64_t ScalarSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kBool: return 1;
    case GgufValueType::kU16: case GgufValueType::kI16: return 2;
    case GgufValueType::kU32: case GgufValueType::kI32: case GgufValueType::kF32: return 4;
    case GgufValueType::kU64: case GgufValueType::kI64: case GgufValueType::kF64: return 8;
    default: return 0;
  }
}

double ReadScalar(const uint8_t* p, GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8: return p[0];
    case GgufValueType::kI8: return int8_t(p[0]);
    case GgufValueType::kBool: return p[0] != 0;
    case GgufValueType::kU16: return LoadLE<uint16_t>(p);
    case GgufValueType::kI16: return LoadLE<int16_t>(p);
    case GgufValueType::kU32: return LoadLE<uint32_t>(p);
    case GgufValueType::kI32: return LoadLE<int32_t>(p);
    case GgufValueType::kF32: return LoadLE<float>(p);
    case GgufValueType::kU64: return double(LoadLE<uint64_t>(p));
    case GgufValueType::kI64: return double(LoadLE<int64_t>(p));
    case GgufValueType::kF64: return LoadLE<double>(p);
    default: return 0;
  }
}

// Reads one value of type t (not an array) into v.
bool ReadValue(Cursor& c, const uint8_t* base, GgufValueType t, GgufValue* v) {
  v->type = t;
  if (t == GgufValueType::kString) return c.ReadString(&v->str);
  const int64_t sz = ScalarSize(t);
  if (sz == 0) return false;
  const int64_t at = c.pos();
  if (!c.Skip(uint64_t(sz))) return false;
  v->number = ReadScalar(base + at, t);
  return true;
}

void Fp32ToBytes(const float* src, uint8_t* dst, int64_t n) { std::memcpy(dst, src, size_t(n) * 4); }

}  // namespace

const char* GgmlTypeName(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return "F32";
    case GgmlType::kF16: return "F16";
    case GgmlType::kBF16: return "BF16";
    case GgmlType::kQ4_0: return "Q4_0";
    case GgmlType::kQ4_1: return "Q4_1";
    case GgmlType::kQ5_0: return "Q5_0";
    case GgmlType::kQ5_1: return "Q5_1";
    case GgmlType::kQ8_0: return "Q8_0";
    case GgmlType::kQ8_1: return "Q8_1";
    case GgmlType::kQ2_K: return "Q2_K";
    case GgmlType::kQ3_K: return "Q3_K";
    case GgmlType::kQ4_K: return "Q4_K";
    case GgmlType::kQ5_K: return "Q5_K";
    case GgmlType::kQ6_K: return "Q6_K";
    case GgmlType::kQ8_K: return "Q8_K";
  }
  return "unknown";
}

bool GgmlTypeInfo(GgmlType t, int64_t* block_elems, int64_t* block_bytes) {
  int64_t e = 0, b = 0;
  switch (t) {
    case GgmlType::kF32: e = 1; b = 4; break;
    case GgmlType::kF16: e = 1; b = 2; break;
    case GgmlType::kBF16: e = 1; b = 2; break;
    case GgmlType::kQ4_0: e = 32; b = 18; break;
    case GgmlType::kQ4_1: e = 32; b = 20; break;
    case GgmlType::kQ5_0: e = 32; b = 22; break;
    case GgmlType::kQ5_1: e = 32; b = 24; break;
    case GgmlType::kQ8_0: e = 32; b = 34; break;
    case GgmlType::kQ4_K: e = 256; b = 144; break;
    case GgmlType::kQ6_K: e = 256; b = 210; break;
    default: return false;
  }
  *block_elems = e;
  *block_bytes = b;
  return true;
}

int64_t GgmlRowBytes(GgmlType t, int64_t n) {
  int64_t e, b;
  if (!GgmlTypeInfo(t, &e, &b) || n < 0 || n % e != 0) return -1;
  return n / e * b;
}

namespace {

inline void GetScaleMinK4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

}  // namespace

void DequantizeRow(GgmlType t, const uint8_t* src, float* dst, int64_t n) {
  switch (t) {
    case GgmlType::kF32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(LoadLE<uint16_t>(src + 2 * i));
      return;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(LoadLE<uint16_t>(src + 2 * i));
      return;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 18, dst += 32) {
        const float d = HalfToFloat(LoadLE<uint16_t>(src));
        const uint8_t* qs = src + 2;
        for (int j = 0; j < 16; ++j) {
          dst[j] = float(int(qs[j] & 0xF) - 8) * d;
          dst[j + 16] = float(int(qs[j] >> 4) - 8) * d;
        }
      }
      return;
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 20, dst += 32) {
        const float d = HalfToFloat(LoadLE<uint16_t>(src));
        const float m = HalfToFloat(LoadLE<uint16_t>(src + 2));
        const uint8_t* qs = src + 4;
        for (int j = 0; j < 16; ++j) {
          dst[j] = float(qs[j] & 0xF) * d + m;
          dst[j + 16] = float(qs[j] >> 4) * d + m;
        }
      }
      return;
    case GgmlType::kQ5_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 22, dst += 32) {
        const float d = HalfToFloat(LoadLE<uint16_t>(src));
        const uint32_t qh = LoadLE<uint32_t>(src + 2);
        const uint8_t* qs = src + 6;
        for (int j = 0; j < 16; ++j) {
          const int h0 = int(((qh >> j) << 4) & 0x10);
          const int h1 = int((qh >> (j + 12)) & 0x10);
          dst[j] = float(((qs[j] & 0xF) | h0) - 16) * d;
          dst[j + 16] = float(((qs[j] >> 4) | h1) - 16) * d;
        }
      }
      return;
    case GgmlType::kQ5_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 24, dst += 32) {
        const float d = HalfToFloat(LoadLE<uint16_t>(src));
        const float m = HalfToFloat(LoadLE<uint16_t>(src + 2));
        const uint32_t qh = LoadLE<uint32_t>(src + 4);
        const uint8_t* qs = src + 8;
        for (int j = 0; j < 16; ++j) {
          const int h0 = int(((qh >> j) << 4) & 0x10);
          const int h1 = int((qh >> (j + 12)) & 0x10);
          dst[j] = float((qs[j] & 0xF) | h0) * d + m;
          dst[j + 16] = float((qs[j] >> 4) | h1) * d + m;
        }
      }
      return;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 34, dst += 32) {
        const float d = HalfToFloat(LoadLE<uint16_t>(src));
        for (int j = 0; j < 32; ++j) dst[j] = float(int8_t(src[2 + j])) * d;
      }
      return;
    case GgmlType::kQ4_K:
      for (int64_t b = 0; b < n / 256; ++b, src += 144) {
        const float d = HalfToFloat(LoadLE<uint16_t>(src));
        const float dmin = HalfToFloat(LoadLE<uint16_t>(src + 2));
        const uint8_t* scales = src + 4;
        const uint8_t* q = src + 16;
        int is = 0;
        for (int j = 0; j < 256; j += 64) {
          uint8_t sc, m;
          GetScaleMinK4(is, scales, &sc, &m);
          const float d1 = d * sc, m1 = dmin * m;
          GetScaleMinK4(is + 1, scales, &sc, &m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) *dst++ = d1 * float(q[l] & 0xF) - m1;
          for (int l = 0; l < 32; ++l) *dst++ = d2 * float(q[l] >> 4) - m2;
          q += 32;
          is += 2;
        }
      }
      return;
    case GgmlType::kQ6_K:
      for (int64_t b = 0; b < n / 256; ++b, src += 210) {
        const uint8_t* ql = src;
        const uint8_t* qh = src + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(src + 192);
        const float d = HalfToFloat(LoadLE<uint16_t>(src + 208));
        for (int part = 0; part < 2; ++part) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            dst[l + 0] = d * float(sc[is + 0]) * float(q1);
            dst[l + 32] = d * float(sc[is + 2]) * float(q2);
            dst[l + 64] = d * float(sc[is + 4]) * float(q3);
            dst[l + 96] = d * float(sc[is + 6]) * float(q4);
          }
          dst += 128;
          ql += 64;
          qh += 32;
          sc += 8;
        }
      }
      return;
    default:
      std::fill(dst, dst + n, 0.f);  // unreachable: callers check GgmlTypeInfo first
      return;
  }
}

namespace {

// x86-64: an AVX2 / FMA clone beside the baseline one, picked at load time (GCC's target_clones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVQ_DOT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KVQ_DOT_CLONES
#endif

// 8-lane vectors (GCC / Clang vector extensions: two SSE registers in the baseline clone, one AVX
// register in the x86-64-v3 one).
// (Every function taking or returning them is inlined: no ABI crosses the clones.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float V8F __attribute__((vector_size(32)));
typedef int32_t V8I __attribute__((vector_size(32)));

__attribute__((always_inline)) inline V8F LoadV8F(const float* p) {
  V8F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename B>
__attribute__((always_inline)) inline V8I Widen8(const B* q) {
  return V8I{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]};
}

// A block's fp16 scale as float: the F16C conversion in the x86-64-v3 clone (GCC's _Float16; the
// baseline clone calls libgcc's), where HalfToFloat's branches cost about as much as the block's
// products; HalfToFloat where the compiler has no _Float16. Exact either way.
__attribute__((always_inline)) inline float BlockScale(const uint8_t* p) {
#if defined(__FLT16_MAX__)
  _Float16 h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
#else
  return HalfToFloat(LoadLE<uint16_t>(p));
#endif
}

// Per 32-element block of type T (Q4_0, Q4_1, Q8_0): d * sum_j q_j x_j with q the block's unsigned
// nibbles (low nibbles the first 16 elements, high nibbles the last 16) or signed bytes, in 8 lanes;
// the block's offset (Q4_1's m, Q4_0's -8 d) enters as offset * xsum[b].
template <GgmlType T>
__attribute__((always_inline)) inline float DotBlocks(const uint8_t* row, const float* x, const float* xsum,
                                                      int64_t blocks) {
  constexpr int kBlockBytes = T == GgmlType::kQ4_0 ? 18 : T == GgmlType::kQ4_1 ? 20 : 34;
  V8F acc = {0, 0, 0, 0, 0, 0, 0, 0};
  float off = 0;
  for (int64_t b = 0; b < blocks; ++b, row += kBlockBytes, x += 32) {
    const float d = BlockScale(row);
    V8F p;
    if constexpr (T == GgmlType::kQ8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(row + 2);
      p = __builtin_convertvector(Widen8(q), V8F) * LoadV8F(x) +
          __builtin_convertvector(Widen8(q + 8), V8F) * LoadV8F(x + 8) +
          __builtin_convertvector(Widen8(q + 16), V8F) * LoadV8F(x + 16) +
          __builtin_convertvector(Widen8(q + 24), V8F) * LoadV8F(x + 24);
    } else {
      const uint8_t* q = row + (T == GgmlType::kQ4_1 ? 4 : 2);
      const V8I a = Widen8(q), c = Widen8(q + 8);
      p = __builtin_convertvector(a & 0xF, V8F) * LoadV8F(x) + __builtin_convertvector(c & 0xF, V8F) * LoadV8F(x + 8) +
          __builtin_convertvector(a >> 4, V8F) * LoadV8F(x + 16) +
          __builtin_convertvector(c >> 4, V8F) * LoadV8F(x + 24);
      off += (T == GgmlType::kQ4_1 ? BlockScale(row + 2) : -8.f * d) * xsum[b];
    }
    acc += d * p;
  }
  return (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + off;
}

// One clone set per type (the clones are resolved once, at load time).
template <GgmlType T>
KVQ_DOT_CLONES float DotBlocksOf(const uint8_t* row, const float* x, const float* xsum, int64_t blocks) {
  return DotBlocks<T>(row, x, xsum, blocks);
}

}  // namespace

bool HasDotRow(GgmlType t) { return t == GgmlType::kQ4_0 || t == GgmlType::kQ4_1 || t == GgmlType::kQ8_0; }

bool DotRow(GgmlType t, const uint8_t* row, const float* x, const float* xsum, int64_t n, float* out) {
  switch (t) {
    case GgmlType::kQ4_0: *out = DotBlocksOf<GgmlType::kQ4_0>(row, x, xsum, n / 32); return true;
    case GgmlType::kQ4_1: *out = DotBlocksOf<GgmlType::kQ4_1>(row, x, xsum, n / 32); return true;
    case GgmlType::kQ8_0: *out = DotBlocksOf<GgmlType::kQ8_0>(row, x, xsum, n / 32); return true;
    default: return false;
  }
}

void BlockSums32(const float* x, int64_t n, float* xsum) {
  for (int64_t b = 0; b < n / 32; ++b) {
    float s = 0;
    for (int j = 0; j < 32; ++j) s += x[32 * b + j];
    xsum[b] = s;
  }
}

bool QuantizeRow(GgmlType t, const float* src, uint8_t* dst, int64_t n) {
  auto put16 = [](uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); };
  switch (t) {
    case GgmlType::kF32:
      Fp32ToBytes(src, dst, n);
      return true;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) put16(dst + 2 * i, FloatToHalf(src[i]));
      return true;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) put16(dst + 2 * i, FloatToBf16(src[i]));
      return true;
    case GgmlType::kQ8_0:
      if (n % 32) return false;
      for (int64_t b = 0; b < n / 32; ++b, src += 32, dst += 34) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(src[j]));
        const float d = amax / 127.f;
        const float id = d > 0 ? 1.f / d : 0.f;
        put16(dst, FloatToHalf(d));
        for (int j = 0; j < 32; ++j) dst[2 + j] = uint8_t(int8_t(std::lrintf(src[j] * id)));
      }
      return true;
    case GgmlType::kQ4_0:
      if (n % 32) return false;
      for (int64_t b = 0; b < n / 32; ++b, src += 32, dst += 18) {
        float amax = 0, mx = 0;
        for (int j = 0; j < 32; ++j) {
          if (std::fabs(src[j]) > amax) { amax = std::fabs(src[j]); mx = src[j]; }
        }
        const float d = mx / -8.f;
        const float id = d != 0 ? 1.f / d : 0.f;
        put16(dst, FloatToHalf(d));
        for (int j = 0; j < 16; ++j) {
          const int a = std::min(15, int(src[j] * id + 8.5f));
          const int c = std::min(15, int(src[j + 16] * id + 8.5f));
          dst[2 + j] = uint8_t(a | (c << 4));
        }
      }
      return true;
    case GgmlType::kQ4_1:
      if (n % 32) return false;
      for (int64_t b = 0; b < n / 32; ++b, src += 32, dst += 20) {
        float mn = src[0], mx = src[0];
        for (int j = 1; j < 32; ++j) { mn = std::min(mn, src[j]); mx = std::max(mx, src[j]); }
        const float d = (mx - mn) / 15.f;
        const float id = d != 0 ? 1.f / d : 0.f;
        put16(dst, FloatToHalf(d));
        put16(dst + 2, FloatToHalf(mn));
        for (int j = 0; j < 16; ++j) {
          const int a = std::min(15, int((src[j] - mn) * id + 0.5f));
          const int c = std::min(15, int((src[j + 16] - mn) * id + 0.5f));
          dst[4 + j] = uint8_t(a | (c << 4));
        }
      }
      return true;
    default:
      return false;
  }
}

int64_t GgufTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) munmap(mapping_, size_t(size_));
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path, bool progress) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open model file ", path, ": ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->size_ = st.st_size;
  if (f->size_ > 0) {
    void* m = mmap(nullptr, size_t(f->size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("mmap ", path, ": ", std::strerror(errno)));
    }
    f->mapping_ = m;
    f->base_ = static_cast<const uint8_t*>(m);
  }
  ::close(fd);
  auto st2 = f->Parse(path);
  if (!st2.ok()) return st2;
  if (progress && !f->tensors_.empty()) {
    // Read every tensor's pages in now (a cold mmap would otherwise stall the first request).
    int64_t total = 0, done = 0;
    for (const auto& t : f->tensors_) total += t.bytes;
    volatile uint8_t sink = 0;
    int last = -1;
    const bool tty = isatty(2) != 0;  // a log file gets the final line only
    for (const auto& t : f->tensors_) {
      for (int64_t i = 0; i < t.bytes; i += 4096) sink = uint8_t(sink + t.data[i]);
      done += t.bytes;
      const int pct = total > 0 ? int(100 * done / total) : 100;
      if (pct != last && (tty || pct == 100)) {
        last = pct;
        const int bars = pct / 5;
        std::fprintf(stderr, "\rloading %s [%-20s] %3d%% %6.1f MiB", path.c_str(), std::string(bars, '#').c_str(), pct,
                     double(done) / (1 << 20));
      }
    }
    std::fprintf(stderr, "\n");
  }
  return f;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBytes(const std::string& bytes) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->owned_ = bytes;
  f->base_ = reinterpret_cast<const uint8_t*>(f->owned_.data());
  f->size_ = int64_t(f->owned_.size());
  auto st = f->Parse("<memory>");
  if (!st.ok()) return st;
  return f;
}

absl::Status GgufFile::Parse(const std::string& what) {
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat("malformed GGUF file ", what, ": ", msg));
  };
  Cursor c(base_, size_);
  uint32_t magic = 0;
  if (!c.Read(&magic)) return bad("shorter than the header");
  if (magic != kGgufMagic) return bad("wrong magic (not a GGUF file)");
  if (!c.Read(&version_)) return bad("truncated header");
  if (version_ != 2 && version_ != 3) return absl::InvalidArgumentError(absl::StrCat("unsupported GGUF version ", version_, " in ", what));
  uint64_t n_tensors = 0, n_kv = 0;
  if (!c.Read(&n_tensors) || !c.Read(&n_kv)) return bad("truncated header");
  // Each entry takes at least 8 bytes: a count beyond the file size is corrupt, not a huge model.
  if (n_tensors > uint64_t(size_) / 8 || n_kv > uint64_t(size_) / 8) return bad("impossible tensor or key count");
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    uint32_t type;
    if (!c.ReadString(&key) || !c.Read(&type)) return bad(absl::StrCat("truncated metadata entry ", i));
    GgufValue v;
    if (type == uint32_t(GgufValueType::kArray)) {
      uint32_t et;
      uint64_t n;
      if (!c.Read(&et) || !c.Read(&n)) return bad(absl::StrCat("truncated array ", key));
      v.type = GgufValueType::kArray;
      v.elem_type = GgufValueType(et);
      if (v.elem_type == GgufValueType::kString) {
        if (n > uint64_t(size_) / 8) return bad(absl::StrCat("impossible array length in ", key));
        v.strings.resize(n);
        for (uint64_t j = 0; j < n; ++j)
          if (!c.ReadString(&v.strings[j])) return bad(absl::StrCat("truncated string array ", key));
      } else {
        const int64_t sz = ScalarSize(v.elem_type);
        if (sz == 0) return bad(absl::StrCat("unsupported array element type ", et, " in ", key));
        if (n > uint64_t(size_) / uint64_t(sz)) return bad(absl::StrCat("truncated array ", key));
        const int64_t at = c.pos();
        if (!c.Skip(n * uint64_t(sz))) return bad(absl::StrCat("truncated array ", key));
        v.numbers.resize(n);
        for (uint64_t j = 0; j < n; ++j) v.numbers[j] = ReadScalar(base_ + at + int64_t(j) * sz, v.elem_type);
      }
    } else {
      if (type > uint32_t(GgufValueType::kF64)) return bad(absl::StrCat("unknown value type ", type, " for ", key));
      if (!ReadValue(c, base_, GgufValueType(type), &v)) return bad(absl::StrCat("truncated value of ", key));
    }
    kv_[key] = std::move(v);
  }
  int64_t alignment = int64_t(NumberOr("general.alignment", double(kDefaultAlignment)));
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0) return bad("general.alignment is not a power of two");
  struct Info { uint64_t offset; };
  std::vector<Info> infos;
  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    uint32_t nd, type;
    if (!c.ReadString(&t.name) || !c.Read(&nd)) return bad(absl::StrCat("truncated tensor info ", i));
    if (nd == 0 || nd > kMaxDims) return bad(absl::StrCat("tensor ", t.name, " has ", nd, " dimensions"));
    int64_t elems = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      uint64_t dim;
      if (!c.Read(&dim)) return bad(absl::StrCat("truncated tensor info ", t.name));
      if (dim == 0 || dim > (1ull << 40) || elems > (int64_t(1) << 50) / int64_t(dim))
        return bad(absl::StrCat("tensor ", t.name, " has an impossible shape"));
      t.dims.push_back(int64_t(dim));
      elems *= int64_t(dim);
    }
    uint64_t off;
    if (!c.Read(&type) || !c.Read(&off)) return bad(absl::StrCat("truncated tensor info ", t.name));
    t.type = GgmlType(type);
    int64_t be, bb;
    if (!GgmlTypeInfo(t.type, &be, &bb))
      return absl::UnimplementedError(absl::StrCat("tensor ", t.name, " in ", what, " has type ", GgmlTypeName(t.type),
                                                   " (", type, "), which the worker does not support"));
    if (t.dims[0] % be != 0) return bad(absl::StrCat("tensor ", t.name, " row of ", t.dims[0], " is not a multiple of the ", GgmlTypeName(t.type), " block"));
    t.bytes = elems / be * bb;
    infos.push_back({off});
    by_name_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  const int64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    auto& t = tensors_[i];
    const uint64_t off = infos[i].offset;
    if (off % uint64_t(alignment) != 0) return bad(absl::StrCat("tensor ", t.name, " data is not aligned"));
    if (data_start > size_ || off > uint64_t(size_ - data_start) || uint64_t(t.bytes) > uint64_t(size_ - data_start) - off)
      return bad(absl::StrCat("tensor ", t.name, " data lies beyond the end of the file (truncated?)"));
    t.data = base_ + data_start + int64_t(off);
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

absl::StatusOr<double> GgufFile::GetNumber(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF metadata has no ", key));
  if (v->type == GgufValueType::kString || v->type == GgufValueType::kArray)
    return absl::InvalidArgumentError(absl::StrCat("GGUF metadata ", key, " is not a number"));
  return v->number;
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF metadata has no ", key));
  if (v->type != GgufValueType::kString) return absl::InvalidArgumentError(absl::StrCat("GGUF metadata ", key, " is not a string"));
  return v->str;
}

double GgufFile::NumberOr(const std::string& key, double fallback) const {
  auto v = GetNumber(key);
  return v.ok() ? *v : fallback;
}

const GgufTensor* GgufFile::tensor(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

// ---- writer ----

namespace {
template <typename T>
void Put(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void PutStr(std::string* s, const std::string& v) {
  Put<uint64_t>(s, v.size());
  s->append(v);
}
void PutScalar(std::string* s, GgufValueType t, double v) {
  switch (t) {
    case GgufValueType::kU8: Put<uint8_t>(s, uint8_t(v)); break;
    case GgufValueType::kI8: Put<int8_t>(s, int8_t(v)); break;
    case GgufValueType::kBool: Put<uint8_t>(s, v != 0); break;
    case GgufValueType::kU16: Put<uint16_t>(s, uint16_t(v)); break;
    case GgufValueType::kI16: Put<int16_t>(s, int16_t(v)); break;
    case GgufValueType::kU32: Put<uint32_t>(s, uint32_t(v)); break;
    case GgufValueType::kI32: Put<int32_t>(s, int32_t(v)); break;
    case GgufValueType::kF32: Put<float>(s, float(v)); break;
    case GgufValueType::kU64: Put<uint64_t>(s, uint64_t(v)); break;
    case GgufValueType::kI64: Put<int64_t>(s, int64_t(v)); break;
    case GgufValueType::kF64: Put<double>(s, v); break;
    default: break;
  }
}
}  // namespace

void GgufWriter::AddNumber(const std::string& key, GgufValueType type, double value) {
  PutStr(&kv_blob_, key);
  Put<uint32_t>(&kv_blob_, uint32_t(type));
  PutScalar(&kv_blob_, type, value);
  ++kv_count_;
}

void GgufWriter::AddString(const std::string& key, const std::string& value) {
  PutStr(&kv_blob_, key);
  Put<uint32_t>(&kv_blob_, uint32_t(GgufValueType::kString));
  PutStr(&kv_blob_, value);
  ++kv_count_;
}

void GgufWriter::AddStrings(const std::string& key, const std::vector<std::string>& values) {
  PutStr(&kv_blob_, key);
  Put<uint32_t>(&kv_blob_, uint32_t(GgufValueType::kArray));
  Put<uint32_t>(&kv_blob_, uint32_t(GgufValueType::kString));
  Put<uint64_t>(&kv_blob_, values.size());
  for (const auto& v : values) PutStr(&kv_blob_, v);
  ++kv_count_;
}

void GgufWriter::AddNumbers(const std::string& key, GgufValueType elem_type, const std::vector<double>& values) {
  PutStr(&kv_blob_, key);
  Put<uint32_t>(&kv_blob_, uint32_t(GgufValueType::kArray));
  Put<uint32_t>(&kv_blob_, uint32_t(elem_type));
  Put<uint64_t>(&kv_blob_, values.size());
  for (double v : values) PutScalar(&kv_blob_, elem_type, v);
  ++kv_count_;
}

absl::Status GgufWriter::AddTensor(const std::string& name, GgmlType type, const std::vector<int64_t>& dims,
                                   const std::vector<float>& data) {
  int64_t elems = 1;
  for (int64_t d : dims) elems *= d;
  if (dims.empty() || int64_t(data.size()) != elems) return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": data size does not match its shape"));
  const int64_t row_bytes = GgmlRowBytes(type, dims[0]);
  if (row_bytes < 0) return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": cannot write type ", GgmlTypeName(type), " with rows of ", dims[0]));
  Pending p{name, type, dims, std::string()};
  const int64_t rows = elems / dims[0];
  p.bytes.resize(size_t(rows * row_bytes));
  for (int64_t r = 0; r < rows; ++r) {
    if (!QuantizeRow(type, data.data() + r * dims[0], reinterpret_cast<uint8_t*>(&p.bytes[size_t(r * row_bytes)]), dims[0]))
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": the writer cannot quantize to ", GgmlTypeName(type)));
  }
  tensors_.push_back(std::move(p));
  return absl::OkStatus();
}

std::string GgufWriter::Header(std::vector<uint64_t>* offsets) const {
  std::string out;
  Put<uint32_t>(&out, kGgufMagic);
  Put<uint32_t>(&out, 3);
  Put<uint64_t>(&out, tensors_.size());
  Put<uint64_t>(&out, uint64_t(kv_count_));
  out += kv_blob_;
  uint64_t off = 0;
  for (const auto& t : tensors_) {
    PutStr(&out, t.name);
    Put<uint32_t>(&out, uint32_t(t.dims.size()));
    for (int64_t d : t.dims) Put<uint64_t>(&out, uint64_t(d));
    Put<uint32_t>(&out, uint32_t(t.type));
    Put<uint64_t>(&out, off);
    offsets->push_back(off);
    off += (t.bytes.size() + kDefaultAlignment - 1) / kDefaultAlignment * kDefaultAlignment;
  }
  out.resize((out.size() + kDefaultAlignment - 1) / kDefaultAlignment * kDefaultAlignment, '\0');
  return out;
}

std::string GgufWriter::Serialize() const {
  std::vector<uint64_t> offsets;
  std::string out = Header(&offsets);
  const size_t data_start = out.size();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    out.resize(data_start + offsets[i], '\0');
    out += tensors_[i].bytes;
  }
  out.resize((out.size() + kDefaultAlignment - 1) / kDefaultAlignment * kDefaultAlignment, '\0');
  return out;
}

absl::Status GgufWriter::WriteFile(const std::string& path) const {
  // Streams the tensors: a large model is never copied into one buffer.
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  std::vector<uint64_t> offsets;
  const std::string header = Header(&offsets);
  f.write(header.data(), std::streamsize(header.size()));
  const std::string pad(size_t(kDefaultAlignment), '\0');
  for (const auto& t : tensors_) {
    f.write(t.bytes.data(), std::streamsize(t.bytes.size()));
    const size_t rem = t.bytes.size() % size_t(kDefaultAlignment);
    if (rem != 0) f.write(pad.data(), std::streamsize(size_t(kDefaultAlignment) - rem));
  }
  if (!f) return absl::InternalError(absl::StrCat("write failed: ", path));
  return absl::OkStatus();
}

}  // namespace kvq::worker
