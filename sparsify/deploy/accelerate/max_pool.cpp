// Max pooling of float32 NCHW tensors without indices, for networks whose convs run as direct
// sparse convs (NCHW): torch's CPU max pool also computes the argmax indices on NCHW input and
// is about 19x slower there than on channels-last input (docs/performance.md). Per output row:
// the elementwise maximum of the window's input rows (vectorized along the row), then the
// maximum over each window's columns. Padding counts as -inf (only real inputs are compared);
// a NaN in a window gives NaN, as in torch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

inline float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// o[xo] = max over dx < kw of v[xo * sw + dx] (v: one row with its padding as -inf). SW: the
// stride as a constant (1, 2), so the strided reads vectorize; 0: taken from sw.
template <int SW>
void window_max(const float* v, float* o, int64_t Wo, int64_t kw, int64_t sw) {
  const int64_t s = SW ? SW : sw;
  for (int64_t xo = 0; xo < Wo; ++xo) o[xo] = v[xo * s];
  for (int64_t dx = 1; dx < kw; ++dx)
    for (int64_t xo = 0; xo < Wo; ++xo) o[xo] = max_nan(o[xo], v[xo * s + dx]);
}

at::Tensor max_pool2d_nchw(const at::Tensor& x_, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "max pool: a 4-D float32 CPU input is needed, got ", x_.sizes(), " ", x_.scalar_type());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "max pool: two values each");
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw,
              "max pool: bad kernel/stride/padding (padding at most half the kernel)");
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw, "max pool: the input is smaller than the kernel");
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto wmax = sw == 1 ? window_max<1> : sw == 2 ? window_max<2> : window_max<0>;
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    // one row's vertical maximum, with pw columns of -inf on each side
    std::vector<float> vm(W + 2 * pw + kw, -std::numeric_limits<float>::infinity());
    float* v = vm.data() + pw;
    for (int64_t i = b; i < e; ++i) {
      const float* plane = xp + i * H * W;
      float* o = op + i * Ho * Wo;
      for (int64_t y = 0; y < Ho; ++y) {
        // padding at most half the kernel: every window holds at least one real row and column
        const int64_t y0 = std::max<int64_t>(0, y * sh - ph), y1 = std::min(H, y * sh - ph + kh);
        std::copy(plane + y0 * W, plane + (y0 + 1) * W, v);
        for (int64_t r = y0 + 1; r < y1; ++r) {
          const float* row = plane + r * W;
          for (int64_t c = 0; c < W; ++c) v[c] = max_nan(v[c], row[c]);
        }
        wmax(vm.data(), o + y * Wo, Wo, kw, sw);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsify_direct, m) {
  m.def("max_pool2d(Tensor x, int[] kernel_size, int[] stride, int[] padding) -> Tensor", &max_pool2d_nchw);
}
