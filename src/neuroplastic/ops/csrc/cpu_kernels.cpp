// neuroplastic's fused CPU kernels for the GPT's eager hot path, float32 and float64.
//
// Built on first use by neuroplastic.ops.native (torch.utils.cpp_extension) and registered
// as torch.ops.neuroplastic.*, each with its own C++ autograd node, so neither the forward
// nor the backward goes through Python:
//
//   rms_norm(x, weight, eps) -> y                 y = x * rsqrt(mean(x^2, -1) + eps) * weight
//   rope_qkv_(qkv, cos, sin, interleaved) -> (q, k, v)
//       qkv: c_attn's output viewed (B, T, 3, nh, hd), contiguous. Rotates the query and
//       key heads IN PLACE (pairs (2i, 2i+1) when interleaved, else (i, i + hd/2)) by the
//       angles whose cos/sin are (T, hd/2), and returns q, k, v as (B, nh, T, hd) views of
//       qkv (nanoGPT's layout for SDPA: no new buffer). The backward writes the
//       conjugate-rotated q/k gradients and the v gradient into one (B, T, 3, nh, hd)
//       gradient: the one copy a split's backward makes anyway.
//   rope_qkv(qkv, cos, sin, interleaved) -> (q, k, v) and rope_qkv_backward: the same
//       without mutation or aliasing (new (B, T, nh, hd) tensors), for torch.compile's graph
//       (fake and autograd formulas in native.py).
//
// The formulas are the ones of neuroplastic.models.transformer (RMSNorm, apply_rope); the
// tests compare both and run gradcheck in float64. Rows are split over ATen's intra-op
// threads; the weight gradient is summed per thread, then over threads in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

int64_t row_grain(int64_t d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1)); }

// ----------------------------------------------------------------------------- RMSNorm

void check_rms(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "neuroplastic::rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0),
              "neuroplastic::rms_norm: weight must be (d,) for an input (..., d)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "neuroplastic::rms_norm: input and weight dtypes differ");
}

std::tuple<at::Tensor, at::Tensor> rms_forward(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  check_rms(x_, w_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = w_.contiguous();
  const int64_t d = x.size(-1);
  const int64_t n = d == 0 ? 0 : x.numel() / d;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neuroplastic_rms_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* rp = rstd.data_ptr<scalar_t>();
    const scalar_t inv_d = scalar_t(1) / scalar_t(d);
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xr = xp + i * d;
        scalar_t* yr = yp + i * d;
        scalar_t ss = 0;
        _Pragma("omp simd reduction(+ : ss)")
        for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
        const scalar_t r = scalar_t(1) / std::sqrt(ss * inv_d + e);
        rp[i] = r;
        _Pragma("omp simd")
        for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * r * wp[j];
      }
    });
  });
  return {y, rstd};
}

// dx = r * (g w) - r^3 x mean(g w x);  dw = sum over rows of g x r
std::tuple<at::Tensor, at::Tensor> rms_backward(const at::Tensor& g_, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& rstd, bool weight_grad) {
  const at::Tensor g = g_.contiguous();
  const int64_t d = x.size(-1);
  const int64_t n = d == 0 ? 0 : x.numel() / d;
  at::Tensor dx = at::empty_like(x);
  const int64_t nthreads = at::get_num_threads();
  at::Tensor dw_parts = weight_grad ? at::zeros({nthreads, d}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neuroplastic_rms_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* rp = rstd.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dwb = weight_grad ? dw_parts.data_ptr<scalar_t>() : nullptr;
    const scalar_t inv_d = scalar_t(1) / scalar_t(d);
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_CHECK(tid < nthreads, "neuroplastic::rms_norm backward: thread id out of range");
      scalar_t* dw = weight_grad ? dwb + tid * d : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* gr = gp + i * d;
        const scalar_t* xr = xp + i * d;
        scalar_t* dr = dxp + i * d;
        const scalar_t r = rp[i];
        scalar_t a = 0;
        _Pragma("omp simd reduction(+ : a)")
        for (int64_t j = 0; j < d; ++j) a += gr[j] * wp[j] * xr[j];
        const scalar_t c = r * r * r * a * inv_d;
        _Pragma("omp simd")
        for (int64_t j = 0; j < d; ++j) dr[j] = r * gr[j] * wp[j] - c * xr[j];
        if (dw != nullptr) {
          _Pragma("omp simd")
          for (int64_t j = 0; j < d; ++j) dw[j] += gr[j] * xr[j] * r;
        }
      }
    });
  });
  return {dx, weight_grad ? dw_parts.sum(0) : at::Tensor()};
}

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    auto [y, rstd] = rms_forward(x, w, eps);
    ctx->save_for_backward({x.contiguous(), w.contiguous(), rstd});
    return y;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dx, dw] = rms_backward(grads[0], saved[0], saved[1], saved[2], ctx->needs_input_grad(1));
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), dw, at::Tensor()};
  }
};

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  return std::get<0>(rms_forward(x, w, eps));
}

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& w, double eps) {
  return RMSNormFunction::apply(x, w, eps);
}

// ----------------------------------------------------------------------------- RoPE

// Rotates pair (a, b) by (c, s): sign +1 forward, -1 for the transpose (the backward).
template <typename scalar_t>
inline void rotate_head(const scalar_t* src, int64_t src_stride, scalar_t* dst, const scalar_t* c,
                        const scalar_t* s, int64_t half, bool interleaved, scalar_t sign) {
  if (interleaved) {
    if (src_stride == 1) {
      _Pragma("omp simd")
      for (int64_t i = 0; i < half; ++i) {
        const scalar_t a = src[2 * i], b = src[2 * i + 1], si = sign * s[i];
        dst[2 * i] = a * c[i] - b * si;
        dst[2 * i + 1] = a * si + b * c[i];
      }
    } else {
      for (int64_t i = 0; i < half; ++i) {
        const scalar_t a = src[2 * i * src_stride], b = src[(2 * i + 1) * src_stride], si = sign * s[i];
        dst[2 * i] = a * c[i] - b * si;
        dst[2 * i + 1] = a * si + b * c[i];
      }
    }
  } else {
    const scalar_t* src2 = src + half * src_stride;
    if (src_stride == 1) {
      _Pragma("omp simd")
      for (int64_t i = 0; i < half; ++i) {
        const scalar_t a = src[i], b = src2[i], si = sign * s[i];
        dst[i] = a * c[i] - b * si;
        dst[i + half] = a * si + b * c[i];
      }
    } else {
      for (int64_t i = 0; i < half; ++i) {
        const scalar_t a = src[i * src_stride], b = src2[i * src_stride], si = sign * s[i];
        dst[i] = a * c[i] - b * si;
        dst[i + half] = a * si + b * c[i];
      }
    }
  }
}

void check_rope(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qkv.device().is_cpu(), "neuroplastic::rope_qkv_: CPU tensors only");
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && qkv.is_contiguous(),
              "neuroplastic::rope_qkv_: qkv must be a contiguous (B, T, 3, nh, hd) tensor");
  TORCH_CHECK(qkv.size(4) % 2 == 0, "neuroplastic::rope_qkv_: the head size must be even");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == qkv.size(1) &&
                  cos.size(1) == qkv.size(4) / 2,
              "neuroplastic::rope_qkv_: cos and sin must be (T, hd/2)");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "neuroplastic::rope_qkv_: cos/sin must have qkv's dtype");
}

tensor_list rope_views(const at::Tensor& qkv) {
  return {qkv.select(2, 0).transpose(1, 2), qkv.select(2, 1).transpose(1, 2), qkv.select(2, 2).transpose(1, 2)};
}

void rope_rotate_inplace(at::Tensor& qkv, const at::Tensor& cos_, const at::Tensor& sin_, bool interleaved) {
  check_rope(qkv, cos_, sin_);
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), nh = qkv.size(3), hd = qkv.size(4), half = hd / 2;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "neuroplastic_rope_forward", [&] {
    scalar_t* p = qkv.data_ptr<scalar_t>();
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * T, row_grain(2 * nh * hd), [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t t = bt % T;
        scalar_t* row = p + bt * 3 * nh * hd;  // q heads then k heads: 2 * nh heads
        for (int64_t h = 0; h < 2 * nh; ++h) {
          scalar_t* x = row + h * hd;
          rotate_head<scalar_t>(x, 1, x, cp + t * half, sp + t * half, half, interleaved, scalar_t(1));
        }
      }
    });
  });
}

// The gradient of (q, k, v) = rotate(qkv): q/k gradients rotated by minus the angles and the
// v gradient, all written into one (B, T, 3, nh, hd) tensor. grads are (B, nh, T, hd) with
// any strides, or undefined (zero); undefined when all are.
at::Tensor rope_qkv_grad(const tensor_list& grads, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                         int64_t B) {
    const int64_t T = cos.size(0), half = cos.size(1), hd = 2 * half;
    const at::Tensor* like = nullptr;
    for (const auto& g : grads) if (g.defined()) { like = &g; break; }
    if (like == nullptr) return at::Tensor();
    const int64_t nh = like->size(1);
    for (const auto& g : grads)
      TORCH_CHECK(!g.defined() || (g.dim() == 4 && g.scalar_type() == cos.scalar_type()),
                  "neuroplastic::rope_qkv backward: unexpected gradient");
    at::Tensor grad = at::empty({B, T, 3, nh, hd}, like->options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "neuroplastic_rope_backward", [&] {
      scalar_t* out = grad.data_ptr<scalar_t>();
      const scalar_t* cp = cos.const_data_ptr<scalar_t>();
      const scalar_t* sp = sin.const_data_ptr<scalar_t>();
      const scalar_t* gp[3];
      int64_t st[3][4];
      for (int s = 0; s < 3; ++s) {
        gp[s] = grads[s].defined() ? grads[s].const_data_ptr<scalar_t>() : nullptr;
        for (int k = 0; k < 4; ++k) st[s][k] = grads[s].defined() ? grads[s].stride(k) : 0;
      }
      at::parallel_for(0, B * T, row_grain(3 * nh * hd), [&](int64_t begin, int64_t end) {
        for (int64_t bt = begin; bt < end; ++bt) {
          const int64_t b = bt / T, t = bt % T;
          scalar_t* row = out + bt * 3 * nh * hd;
          for (int s = 0; s < 3; ++s) {
            for (int64_t h = 0; h < nh; ++h) {
              scalar_t* dst = row + (s * nh + h) * hd;
              if (gp[s] == nullptr) {
                std::fill(dst, dst + hd, scalar_t(0));
                continue;
              }
              const scalar_t* src = gp[s] + b * st[s][0] + h * st[s][1] + t * st[s][2];
              if (s == 2) {
                const int64_t sd = st[s][3];
                for (int64_t j = 0; j < hd; ++j) dst[j] = src[j * sd];
              } else {
                rotate_head<scalar_t>(src, st[s][3], dst, cp + t * half, sp + t * half, half, interleaved,
                                      scalar_t(-1));
              }
            }
          }
        }
      });
    });
    return grad;
}

class RopeQKVFunction : public torch::autograd::Function<RopeQKVFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin,
                             bool interleaved) {
    rope_rotate_inplace(qkv, cos, sin, interleaved);
    // written through raw pointers: tell autograd, so anything that saved qkv for its own
    // backward fails loudly instead of reading rotated values
    qkv.unsafeGetTensorImpl()->bump_version();
    ctx->save_for_backward({cos.contiguous(), sin.contiguous()});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["B"] = qkv.size(0);
    return rope_views(qkv);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool interleaved = ctx->saved_data["interleaved"].toBool();
    const int64_t B = ctx->saved_data["B"].toInt();
    return {rope_qkv_grad(grads, saved[0], saved[1], interleaved, B), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Functional forms for torch.compile (no mutation, no aliasing: what functionalization
// and inductor accept; fake and autograd formulas registered in native.py). rope_qkv: q, k
// (rotated) and v as new (B, T, nh, hd) tensors; rope_qkv_backward: their gradients (any
// strides) into one (B, T, 3, nh, hd) gradient of qkv.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv_functional(const at::Tensor& qkv, const at::Tensor& cos_,
                                                                   const at::Tensor& sin_, bool interleaved) {
  check_rope(qkv, cos_, sin_);
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), nh = qkv.size(3), hd = qkv.size(4), half = hd / 2;
  at::Tensor q = at::empty({B, T, nh, hd}, qkv.options()), k = at::empty_like(q), v = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "neuroplastic_rope_qkv", [&] {
    const scalar_t* p = qkv.const_data_ptr<scalar_t>();
    scalar_t* outs[3] = {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>()};
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * T, row_grain(3 * nh * hd), [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t t = bt % T;
        const scalar_t* row = p + bt * 3 * nh * hd;
        for (int s = 0; s < 2; ++s)
          for (int64_t h = 0; h < nh; ++h)
            rotate_head<scalar_t>(row + (s * nh + h) * hd, 1, outs[s] + (bt * nh + h) * hd, cp + t * half,
                                  sp + t * half, half, interleaved, scalar_t(1));
        std::copy(row + 2 * nh * hd, row + 3 * nh * hd, outs[2] + bt * nh * hd);
      }
    });
  });
  return {q, k, v};
}

at::Tensor rope_qkv_backward_cpu(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv,
                                 const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  TORCH_CHECK(gq.dim() == 4 && gk.sizes() == gq.sizes() && gv.sizes() == gq.sizes(),
              "neuroplastic::rope_qkv_backward: gradients must be three (B, T, nh, hd) tensors");
  return rope_qkv_grad({gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2)}, cos, sin, interleaved,
                       gq.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv_cpu(at::Tensor& qkv, const at::Tensor& cos,
                                                            const at::Tensor& sin, bool interleaved) {
  rope_rotate_inplace(qkv, cos, sin, interleaved);
  auto v = rope_views(qkv);
  return {v[0], v[1], v[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv_autograd(at::Tensor& qkv, const at::Tensor& cos,
                                                                 const at::Tensor& sin, bool interleaved) {
  auto out = RopeQKVFunction::apply(qkv, cos, sin, interleaved);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(neuroplastic, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_qkv_(Tensor(a!) qkv, Tensor cos, Tensor sin, bool interleaved) -> (Tensor(a), Tensor(a), Tensor(a))");
  m.def("rope_qkv(Tensor qkv, Tensor cos, Tensor sin, bool interleaved) -> (Tensor, Tensor, Tensor)");
  m.def("rope_qkv_backward(Tensor gq, Tensor gk, Tensor gv, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(neuroplastic, CPU, m) {
  m.impl("rms_norm", rms_norm_cpu);
  m.impl("rope_qkv_", rope_qkv_cpu);
  m.impl("rope_qkv", rope_qkv_functional);
  m.impl("rope_qkv_backward", rope_qkv_backward_cpu);
}

TORCH_LIBRARY_IMPL(neuroplastic, Autograd, m) {
  m.impl("rms_norm", rms_norm_autograd);
  m.impl("rope_qkv_", rope_qkv_autograd);
}
