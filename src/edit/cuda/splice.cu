// Fused SAE splice kernels, compiled at run time by NVRTC (no headers: f16/bf16 are
// handled as raw 16-bit words and widened to f32 here). Every sum accumulates in f32.
//
// Weight dtypes: `W` is one of F32 / F16 / BF16 below; each templated kernel is
// instantiated once per dtype under an `extern "C"` name ending in _f32, _f16 or _bf16.
//
// Normalization codes (`norm`): 0 none, 1 constant factor `sf`, 2 constant_norm_rescale,
// 3 layer_norm. Architecture codes (`arch`): 0 standard, 1 jumprelu, 2 topk, 3 gated.

typedef unsigned short u16;
typedef unsigned int u32;

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float get(const float* p, long long i) { return p[i]; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float get(const u16* p, long long i) {
        float f;
        asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(p[i]));
        return f;
    }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float get(const u16* p, long long i) {
        return __uint_as_float(((u32)p[i]) << 16);
    }
};

// f32 -> f16 / bf16 (round to nearest even), for the GEMM input in the stored dtype.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u); // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Per-token normalization of row `x[0..d)`, computed by one warp: returns the encoder
// input map x' = (x - sub) * mul (then minus b_dec when configured) and the
// denormalization y * scale + shift. Matches the CPU kernels' `prepare`.
struct Norm {
    float mul, sub, scale, shift;
};
__device__ Norm warp_norm(const float* x, int d, int norm, float sf) {
    Norm r;
    r.mul = 1.f; r.sub = 0.f; r.scale = 1.f; r.shift = 0.f;
    int lane = threadIdx.x & 31;
    if (norm == 1) {
        r.mul = sf; r.scale = 1.f / sf;
    } else if (norm == 2) {
        float s = 0.f;
        for (int k = lane; k < d; k += 32) s += x[k] * x[k];
        float nrm = sqrtf(warp_sum(s));
        float coeff = sqrtf((float)d) / nrm;
        r.mul = coeff; r.scale = 1.f / coeff;
    } else if (norm == 3) {
        float s = 0.f;
        for (int k = lane; k < d; k += 32) s += x[k];
        float mu = warp_sum(s) / (float)d;
        float v = 0.f;
        for (int k = lane; k < d; k += 32) { float c = x[k] - mu; v += c * c; }
        float var = warp_sum(v) / (d > 1 ? (float)(d - 1) : 1.f);
        float sd = sqrtf(var);
        r.mul = 1.f / (sd + 1e-5f); r.sub = mu; r.scale = sd; r.shift = mu;
    }
    return r;
}

// ---------------------------------------------------------------------------------------
// Input conversion: x (f16 / bf16 words) -> f32.
extern "C" __global__ void to_f32_f16(const u16* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = F16::get(x, i);
}
extern "C" __global__ void to_f32_bf16(const u16* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = BF16::get(x, i);
}

// ---------------------------------------------------------------------------------------
// Masked path: y = x + s(x) * sum_{j in S} (a_j f_j + b_j - f_j) * dec[j] (+ steer).
//
// One block of MT*MS threads per tile of MT tokens. The |S| latents run in groups of MS;
// for each group the encoder columns are staged in shared memory chunk by chunk (MS x MC
// values, shared by the MT tokens of the tile), each thread computes one (token, latent)
// pre-activation, the deltas go to shared memory, and the decoder rows of the group are
// streamed once for the MT tokens. Only |S| encoder columns and decoder rows are read.
#define MT 8
#define MS 32
#define MC 64

template <class W>
__device__ void masked_splice(
    const float* __restrict__ x, float* __restrict__ y, int n, int d,
    const typename W::T* __restrict__ enc,   // [S, d] encoder columns, stored dtype
    const typename W::T* __restrict__ dec,   // [S, d] decoder rows, stored dtype
    const float* __restrict__ b_enc,         // [S]
    const float* __restrict__ thr,           // [S] (jumprelu) or unused
    const float* __restrict__ rmag,          // [S] exp(r_mag) (gated) or unused
    const float* __restrict__ bmag,          // [S] (gated) or unused
    const float* __restrict__ ea, const float* __restrict__ eb, int S,
    const float* __restrict__ b_dec, int apply_b_dec, int norm, float sf, int arch,
    const float* __restrict__ steer)         // [d] or null
{
    __shared__ float xs[MT][MC + 1];
    __shared__ float es[MS][MC + 1];
    __shared__ float delta[MT][MS];
    __shared__ float nmul[MT], nsub[MT], nscale[MT];
    __shared__ int any_delta;

    const int tid = threadIdx.x;
    const int t0 = blockIdx.x * MT;
    const int nt = min(MT, n - t0);
    if (nt <= 0) return;
    const int warp = tid >> 5, lane = tid & 31;

    // y = x (+ steer); per-token normalization, one warp per token.
    for (int t = 0; t < nt; ++t) {
        const float* xt = x + (long long)(t0 + t) * d;
        float* yt = y + (long long)(t0 + t) * d;
        for (int k = tid; k < d; k += blockDim.x) yt[k] = xt[k] + (steer ? steer[k] : 0.f);
    }
    if (warp < nt) {
        Norm r = warp_norm(x + (long long)(t0 + warp) * d, d, norm, sf);
        if (lane == 0) { nmul[warp] = r.mul; nsub[warp] = r.sub; nscale[warp] = r.scale; }
    }
    __syncthreads();

    const int tt = tid / MS, jj = tid % MS;   // this thread's (token, latent) in the tile
    for (int g0 = 0; g0 < S; g0 += MS) {
        const int ng = min(MS, S - g0);
        float acc = 0.f;
        for (int c0 = 0; c0 < d; c0 += MC) {
            const int nc = min(MC, d - c0);
            for (int e = tid; e < MT * MC; e += blockDim.x) {
                int t = e / MC, k = e % MC;
                float v = 0.f;
                if (t < nt && k < nc) {
                    v = (x[(long long)(t0 + t) * d + c0 + k] - nsub[t]) * nmul[t];
                    if (apply_b_dec) v -= b_dec[c0 + k];
                }
                xs[t][k] = v;
            }
            for (int e = tid; e < MS * MC; e += blockDim.x) {
                int j = e / MC, k = e % MC;
                es[j][k] = (j < ng && k < nc) ? W::get(enc, (long long)(g0 + j) * d + c0 + k) : 0.f;
            }
            __syncthreads();
            for (int k = 0; k < nc; ++k) acc += xs[tt][k] * es[jj][k];
            __syncthreads();
        }
        if (tid == 0) any_delta = 0;
        __syncthreads();
        float dl = 0.f;
        if (tt < nt && jj < ng) {
            const int j = g0 + jj;
            float pre = acc + b_enc[j];
            float f;
            if (arch == 1) f = pre > thr[j] ? fmaxf(pre, 0.f) : 0.f;
            else if (arch == 3) f = pre > 0.f ? fmaxf((pre - b_enc[j]) * rmag[j] + bmag[j], 0.f) : 0.f;
            else f = fmaxf(pre, 0.f);
            dl = ea[j] * f + eb[j] - f;
            if (dl != 0.f) any_delta = 1;
        }
        delta[tt][jj] = dl;
        __syncthreads();
        if (any_delta) {
            for (int k = tid; k < d; k += blockDim.x) {
                float out[MT];
#pragma unroll
                for (int t = 0; t < MT; ++t) out[t] = 0.f;
                for (int j = 0; j < ng; ++j) {
                    float w = W::get(dec, (long long)(g0 + j) * d + k);
#pragma unroll
                    for (int t = 0; t < MT; ++t) out[t] += delta[t][j] * w;
                }
                for (int t = 0; t < nt; ++t) y[(long long)(t0 + t) * d + k] += nscale[t] * out[t];
            }
        }
        __syncthreads();
    }
}

#define MASKED(NAME, W)                                                                    \
    extern "C" __global__ void __launch_bounds__(MT * MS) NAME(                            \
        const float* x, float* y, int n, int d, const W::T* enc, const W::T* dec,          \
        const float* b_enc, const float* thr, const float* rmag, const float* bmag,        \
        const float* ea, const float* eb, int S, const float* b_dec, int apply_b_dec,      \
        int norm, float sf, int arch, const float* steer) {                                \
        masked_splice<W>(x, y, n, d, enc, dec, b_enc, thr, rmag, bmag, ea, eb, S, b_dec,  \
                         apply_b_dec, norm, sf, arch, steer);                              \
    }
MASKED(masked_splice_f32, F32)
MASKED(masked_splice_f16, F16)
MASKED(masked_splice_bf16, BF16)

// ---------------------------------------------------------------------------------------
// Full path, step 1: normalize every token, write the encoder input in the GEMM's dtype
// and the per-token denormalization (scale, shift). One warp per token.
__device__ __forceinline__ float ident(float v) { return v; }
#define PREPARE(NAME, T, CONV)                                                              \
    extern "C" __global__ void NAME(const float* __restrict__ x, T* __restrict__ xs,       \
                                    float2* __restrict__ denorm, int n, int d,             \
                                    const float* __restrict__ b_dec, int apply_b_dec,      \
                                    int norm, float sf) {                                  \
        int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);                     \
        int lane = threadIdx.x & 31;                                                       \
        if (row >= n) return;                                                              \
        const float* xt = x + (long long)row * d;                                          \
        Norm r = warp_norm(xt, d, norm, sf);                                               \
        for (int k = lane; k < d; k += 32) {                                               \
            float v = (xt[k] - r.sub) * r.mul;                                             \
            xs[(long long)row * d + k] = CONV(apply_b_dec ? v - b_dec[k] : v);             \
        }                                                                                  \
        if (lane == 0) denorm[row] = make_float2(r.scale, r.shift);                        \
    }
PREPARE(prepare_f32, float, ident)
PREPARE(prepare_f16, u16, f32_to_f16)
PREPARE(prepare_bf16, u16, f32_to_bf16)

// ---------------------------------------------------------------------------------------
// Full path, step 2: the epilogue. One block (EB threads) per token row of the dense
// pre-activations `pre [n, d_sae]` (x' W_enc, bias not yet added). Writes the row's
// active latents as a list sorted by id: ids[row*cap + i], vals[row*cap + i], count[row].
//
// Standard / JumpReLU / gated: an ordered compaction of the non-zero activations.
// TopK: a per-row radix select (4 passes of 8 bits over an order-preserving u32 key)
// finds the k-th largest key K; the latents with key > K and the first ones with
// key == K (lowest ids, as the CPU kernels break ties) are kept. No sort.
#define EB 256

// Block-wide exclusive scan of one int per thread; returns the block total in *total.
__device__ int block_scan(int v, int* total) {
    __shared__ int warp_tot[EB / 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        int u = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += u;
    }
    if (lane == 31) warp_tot[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        int w = lane < EB / 32 ? warp_tot[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int u = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += u;
        }
        if (lane < EB / 32) warp_tot[lane] = w;   // inclusive prefix over warps
    }
    __syncthreads();
    int before = warp > 0 ? warp_tot[warp - 1] : 0;
    *total = warp_tot[EB / 32 - 1];
    __syncthreads();
    return before + inc - v;
}

// Activation of latent i from its pre-activation (bias included); TopK is handled apart.
__device__ __forceinline__ float activate(int arch, float p, int i, const float* thr,
                                          const float* b_enc, const float* rmag,
                                          const float* bmag) {
    if (arch == 1) return (p > 0.f && p > thr[i]) ? p : 0.f;
    if (arch == 3) return p > 0.f ? fmaxf((p - b_enc[i]) * rmag[i] + bmag[i], 0.f) : 0.f;
    return p > 0.f ? p : 0.f;
}

// Order-preserving key: larger float -> larger unsigned key.
__device__ __forceinline__ u32 fkey(float v) {
    u32 u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(EB) epilogue(
    const float* __restrict__ pre, int n, int d_sae, int arch, int k, int is_signed,
    const float* __restrict__ b_enc, const float* __restrict__ thr,
    const float* __restrict__ rmag, const float* __restrict__ bmag,
    const float* __restrict__ dnorm,   // [d_sae] ||W_dec[i]|| (rescaled topk) or null
    u32* __restrict__ ids, float* __restrict__ vals, int* __restrict__ count, int cap) {
    __shared__ int hist[256];
    __shared__ u32 s_prefix;
    __shared__ int s_remaining;
    const int row = blockIdx.x;
    if (row >= n) return;
    const float* p = pre + (long long)row * d_sae;
    u32* oid = ids + (long long)row * cap;
    float* oval = vals + (long long)row * cap;
    const int tid = threadIdx.x;
    int written = 0;

    if (arch != 2) {
        for (int c0 = 0; c0 < d_sae; c0 += EB) {
            int i = c0 + tid;
            float f = i < d_sae ? activate(arch, p[i] + b_enc[i], i, thr, b_enc, rmag, bmag) : 0.f;
            int tot;
            int pos = block_scan(f != 0.f ? 1 : 0, &tot);
            if (f != 0.f && written + pos < cap) {
                oid[written + pos] = (u32)i;
                oval[written + pos] = f;
            }
            written += tot;
        }
        if (tid == 0) count[row] = min(written, cap);
        return;
    }

    // TopK. The value of latent i, recomputed identically in every pass.
#define TOPK_VAL(i) ((p[i] + b_enc[i]) * (dnorm ? dnorm[i] : 1.f))
#define TOPK_KEY(v) (is_signed ? fkey(fabsf(v)) : fkey(v))
    if (tid == 0) { s_prefix = 0u; s_remaining = k; }
    u32 mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += EB) hist[b] = 0;
        __syncthreads();
        const u32 prefix = s_prefix;
        for (int i = tid; i < d_sae; i += EB) {
            u32 key = TOPK_KEY(TOPK_VAL(i));
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
        }
        __syncthreads();
        if (tid == 0) {
            int rem = s_remaining, acc = 0, b = 255;
            for (; b > 0; --b) {
                if (acc + hist[b] >= rem) break;
                acc += hist[b];
            }
            s_remaining = rem - acc;
            s_prefix = prefix | ((u32)b << shift);
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const u32 K = s_prefix;
    const int take_eq = s_remaining;   // how many of the key == K latents are kept
    int eq_seen = 0;
    for (int c0 = 0; c0 < d_sae; c0 += EB) {
        int i = c0 + tid;
        float v = 0.f;
        u32 key = 0u;
        if (i < d_sae) { v = TOPK_VAL(i); key = TOPK_KEY(v); }
        int is_eq = (i < d_sae && key == K) ? 1 : 0;
        int eq_tot;
        int eq_rank = eq_seen + block_scan(is_eq, &eq_tot);
        eq_seen += eq_tot;
        float f = is_signed ? v : fmaxf(v, 0.f);
        int keep = i < d_sae && (key > K || (is_eq && eq_rank < take_eq)) && f != 0.f;
        int tot;
        int pos = block_scan(keep, &tot);
        if (keep && written + pos < cap) {
            oid[written + pos] = (u32)i;
            oval[written + pos] = f;
        }
        written += tot;
    }
    if (tid == 0) count[row] = min(written, cap);
#undef TOPK_VAL
#undef TOPK_KEY
}

// Dense latents from the lists (the `encode` output): f [n, d_sae] must be zeroed.
extern "C" __global__ void scatter_dense(const u32* __restrict__ ids, const float* __restrict__ vals,
                                         const int* __restrict__ count, int cap, int d_sae,
                                         float* __restrict__ f) {
    const int row = blockIdx.x;
    const int c = count[row];
    for (int i = threadIdx.x; i < c; i += blockDim.x)
        f[(long long)row * d_sae + ids[(long long)row * cap + i]] = vals[(long long)row * cap + i];
}

// ---------------------------------------------------------------------------------------
// Full path, step 3: sparse decode, one block per token.
//
// mode 0 (error-preserving): y = x + scale * sum_{j in S} (a_j f_j + b_j - f_j) dec_s[j]
// mode 1 (reconstruction):   y = (b_dec + sum_{i active} f'_i inv_i W_dec[i]
//                                 + sum_{j in S, inactive, b_j != 0} b_j dec_s[j]) * scale + shift
// then + steer. `dec_s` [S, d] f32 holds the edited latents' decoder rows (already divided
// by ||W_dec[j]|| for rescaled TopK); `edit_of` [d_sae] maps a latent to its index in S or -1.
#define DB 256
#define DL 256   // active-list entries staged in shared memory at a time

__device__ __forceinline__ float find_active(const u32* id, const float* val, int c, u32 want) {
    int lo = 0, hi = c;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (id[mid] < want) lo = mid + 1; else hi = mid;
    }
    return (lo < c && id[lo] == want) ? val[lo] : 0.f;
}

template <class W>
__device__ void sparse_decode(
    const float* __restrict__ x, float* __restrict__ y, int n, int d, int mode,
    const u32* __restrict__ ids, const float* __restrict__ vals, const int* __restrict__ count, int cap,
    const float2* __restrict__ denorm,
    const typename W::T* __restrict__ w_dec,   // [d_sae, d] row-major, stored dtype
    const float* __restrict__ inv_norm,       // [d_sae] or null
    const float* __restrict__ dec_s, const u32* __restrict__ sid,
    const float* __restrict__ ea, const float* __restrict__ eb, int S,
    const int* __restrict__ edit_of, const float* __restrict__ b_dec,
    const float* __restrict__ steer) {
    __shared__ u32 lid[DL];
    __shared__ float lval[DL];
    __shared__ float sdelta[DL];
    const int row = blockIdx.x;
    if (row >= n) return;
    const int tid = threadIdx.x;
    const u32* rid = ids + (long long)row * cap;
    const float* rval = vals + (long long)row * cap;
    const int c = count[row];
    const float scale = denorm[row].x, shift = denorm[row].y;
    const float* xt = x + (long long)row * d;
    float* yt = y + (long long)row * d;

    if (mode == 0) {
        for (int k = tid; k < d; k += blockDim.x) yt[k] = xt[k];
        for (int s0 = 0; s0 < S; s0 += DL) {
            const int ns = min(DL, S - s0);
            __syncthreads();
            for (int j = tid; j < ns; j += blockDim.x) {
                float f = find_active(rid, rval, c, sid[s0 + j]);
                sdelta[j] = ea[s0 + j] * f + eb[s0 + j] - f;
            }
            __syncthreads();
            for (int k = tid; k < d; k += blockDim.x) {
                float acc = 0.f;
                for (int j = 0; j < ns; ++j)
                    if (sdelta[j] != 0.f) acc += sdelta[j] * dec_s[(long long)(s0 + j) * d + k];
                yt[k] += scale * acc;
            }
        }
    } else {
        for (int k = tid; k < d; k += blockDim.x) yt[k] = b_dec[k];
        for (int l0 = 0; l0 < c; l0 += DL) {
            const int nl = min(DL, c - l0);
            __syncthreads();
            for (int e = tid; e < nl; e += blockDim.x) {
                u32 i = rid[l0 + e];
                float f = rval[l0 + e];
                int j = edit_of ? edit_of[i] : -1;
                float f2 = j >= 0 ? ea[j] * f + eb[j] : f;
                lid[e] = i;
                lval[e] = f2 * (inv_norm ? inv_norm[i] : 1.f);
            }
            __syncthreads();
            for (int k = tid; k < d; k += blockDim.x) {
                float acc = 0.f;
                for (int e = 0; e < nl; ++e)
                    if (lval[e] != 0.f) acc += lval[e] * W::get(w_dec, (long long)lid[e] * d + k);
                yt[k] += acc;
            }
        }
        // Edited latents that were inactive (clamp / add make them fire).
        for (int s0 = 0; s0 < S; s0 += DL) {
            const int ns = min(DL, S - s0);
            __syncthreads();
            for (int j = tid; j < ns; j += blockDim.x) {
                float b = eb[s0 + j];
                u32 i = sid[s0 + j];
                int lo = 0, hi = c;
                while (lo < hi) { int m = (lo + hi) >> 1; if (rid[m] < i) lo = m + 1; else hi = m; }
                bool active = lo < c && rid[lo] == i;
                sdelta[j] = (b != 0.f && !active) ? b : 0.f;
            }
            __syncthreads();
            for (int k = tid; k < d; k += blockDim.x) {
                float acc = 0.f;
                for (int j = 0; j < ns; ++j)
                    if (sdelta[j] != 0.f) acc += sdelta[j] * dec_s[(long long)(s0 + j) * d + k];
                yt[k] += acc;
            }
        }
        for (int k = tid; k < d; k += blockDim.x) yt[k] = yt[k] * scale + shift;
    }
    if (steer)
        for (int k = tid; k < d; k += blockDim.x) yt[k] += steer[k];
}

#define DECODE(NAME, W)                                                                     \
    extern "C" __global__ void __launch_bounds__(DB) NAME(                                  \
        const float* x, float* y, int n, int d, int mode, const u32* ids, const float* vals, \
        const int* count, int cap, const float2* denorm, const W::T* w_dec,                 \
        const float* inv_norm, const float* dec_s, const u32* sid, const float* ea,         \
        const float* eb, int S, const int* edit_of, const float* b_dec, const float* steer) { \
        sparse_decode<W>(x, y, n, d, mode, ids, vals, count, cap, denorm, w_dec, inv_norm,  \
                         dec_s, sid, ea, eb, S, edit_of, b_dec, steer);                     \
    }
DECODE(sparse_decode_f32, F32)
DECODE(sparse_decode_f16, F16)
DECODE(sparse_decode_bf16, BF16)
