// einplan's fused CUDA kernels (float32), compiled once per process by CuPy (NVRTC).
// Each replaces a chain of NumPy passes with one launch; every scalar that changes between
// runs (a cache slot, a step number, a learning rate, a loss cotangent) is read from device
// memory, so a captured CUDA graph replays them with new values. Inputs that are views of a
// fused product (q, k, v; gate, up) are read in place through their row stride.

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// the sum (or max) of v over the block, returned to every thread; blockDim.x a multiple of 32
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : NEG_INF;
    return warp_max(v);
}

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w; one block per row
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int d,
                                    float inv_d, float eps) {
    const float* xr = x + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i] * xr[i];
    float denom = sqrtf(block_sum(s) * inv_d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] / denom * w[i];
}

// rotary embedding of x (rows, hd), rows = pairs (batch, seq) x `heads`, from a table
// (2, pairs, half) of cos and sin; sign -1 rotates back (the reverse of rope); the heads of a
// pair are contiguous in x, pairs `xs` elements apart
extern "C" __global__ void rope(const float* x, const float* table, float* out, long long n,
                                int half, int heads, long long pairs, float sign, float scale,
                                long long xs) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / half;
        int j = (int)(i % half);
        long long pair = row / heads;
        long long t = pair * half + j;
        float c = table[t], s = sign * table[pairs * half + t];
        const float* xr = x + pair * xs + (row % heads) * 2 * half;
        float x1 = xr[j], x2 = xr[j + half];
        float* orow = out + row * 2 * half;
        orow[j] = (x1 * c - x2 * s) * scale;
        orow[j + half] = (x2 * c + x1 * s) * scale;
    }
}

// softmax(scale * x + mask) over the last axis of x (rows, k), rows = (batch, heads, q); the
// optional mask is (batch, q, k); with `causal`, query i sees keys j <= i + k - q (the rest 0)
extern "C" __global__ void softmax(const float* x, const float* mask, float* out, int q,
                                   int k, int heads, float scale, int causal) {
    long long row = blockIdx.x;
    int qi = (int)(row % q);
    long long b = row / ((long long)q * heads);
    const float* xr = x + row * k;
    const float* mr = mask ? mask + (b * q + qi) * k : nullptr;
    float* orow = out + row * k;
    int visible = causal ? min(k, qi + (k - q) + 1) : k;
    float top = NEG_INF;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        float v = xr[j] * scale + (mr ? mr[j] : 0.0f);
        top = fmaxf(top, v);
    }
    top = block_max(top);
    float s = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x)
        s += expf(xr[j] * scale + (mr ? mr[j] : 0.0f) - top);
    float inv = 1.0f / block_sum(s);
    for (int j = threadIdx.x; j < k; j += blockDim.x)
        orow[j] = j < visible ? expf(xr[j] * scale + (mr ? mr[j] : 0.0f) - top) * inv : 0.0f;
}

// out = gate * sigmoid(gate) * up over rows of `width`; rows of gate and up `gs` and `us`
// elements apart
extern "C" __global__ void silu_mul(const float* g, const float* u, float* out, long long n,
                                    int width, long long gs, long long us) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / width;
        int j = (int)(i % width);
        float gi = g[r * gs + j];
        out[i] = gi / (1.0f + expf(-gi)) * u[r * us + j];
    }
}

// new (b, s, n, h) into cache (b, n, ctx, h) at slots pos[0] .. pos[0] + s; the (n, h) block
// of a (b, s) pair is contiguous in new, pairs `fs` elements apart
extern "C" __global__ void kv_append(float* cache, const float* fresh, const long long* pos,
                                     long long total, int s, int n, int h, long long ctx,
                                     long long fs) {
    long long p = pos[0];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int hi = (int)(i % h);
        long long r = i / h;
        int ni = (int)(r % n);
        r /= n;
        int si = (int)(r % s);
        long long bi = r / s;
        cache[((bi * n + ni) * ctx + p + si) * h + hi] = fresh[(bi * s + si) * fs + ni * h + hi];
    }
}

// per row of logits (rows, vocab): logsumexp - logits[target], 0 for an ignored target
extern "C" __global__ void cross_entropy_rows(const float* logits, const long long* targets,
                                              float* loss, int vocab, long long ignore) {
    long long row = blockIdx.x;
    const float* xr = logits + row * vocab;
    float top = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) top = fmaxf(top, xr[j]);
    top = block_max(top);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(xr[j] - top);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        long long t = targets[row];
        loss[row] = t == ignore ? 0.0f : logf(s) + top - xr[t];
    }
}

// (softmax(logits) - onehot(target)) * ct / max(1, count) per row, 0 for an ignored target
extern "C" __global__ void cross_entropy_grad(const float* logits, const long long* targets,
                                              const float* ct, const long long* count,
                                              float* out, int vocab, long long ignore) {
    long long row = blockIdx.x;
    const float* xr = logits + row * vocab;
    float* orow = out + row * vocab;
    long long t = targets[row];
    if (t == ignore) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) orow[j] = 0.0f;
        return;
    }
    float scale = ct[0] / (float)(count[0] > 1 ? count[0] : 1);
    float top = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) top = fmaxf(top, xr[j]);
    top = block_max(top);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(xr[j] - top);
    float f = scale / block_sum(s);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x)
        orow[j] = expf(xr[j] - top) * f - (j == t ? scale : 0.0f);
}

// AdamW step t = step[0] in place (torch.optim.AdamW), then g = 0; t = 0: leave all as they
// are (accumulate only); a non-finite norm: skip the update, still empty g
extern "C" __global__ void adamw(float* p, float* m, float* v, float* g, const float* norm,
                                 const float* lr, const long long* step, long long n,
                                 float b1, float b2, float eps, float wd, float max_norm) {
    long long t = step[0];
    if (t == 0) return;
    float nrm = norm[0];
    bool apply = isfinite(nrm);
    double rate = lr[0];
    float clip = max_norm > 0 ? (float)fmin(1.0, max_norm / ((double)nrm + 1e-6)) : 1.0f;
    float bc2 = (float)(1.0 / sqrt(1.0 - pow((double)b2, (double)t)));
    float stepsize = (float)(-rate / (1.0 - pow((double)b1, (double)t)));
    float decay = (float)(1.0 - rate * wd);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (apply) {
            float gi = clip < 1.0f ? g[i] * clip : g[i];
            float mi = m[i] * b1 + gi * (1.0f - b1);
            float vi = v[i] * b2 + gi * gi * (1.0f - b2);
            m[i] = mi;
            v[i] = vi;
            float pi = wd != 0.0f ? p[i] * decay : p[i];
            p[i] = pi + mi / (sqrtf(vi) * bc2 + eps) * stepsize;
        }
        g[i] = 0.0f;
    }
}

// SGD with momentum in place (torch.optim.SGD), then g = 0; t = 0 or a non-finite norm as adamw
extern "C" __global__ void sgd(float* p, float* buf, float* g, const float* norm, const float* lr,
                               const long long* step, long long n, float mom, float wd,
                               float max_norm) {
    if (step[0] == 0) return;
    float nrm = norm[0];
    bool apply = isfinite(nrm);
    float rate = lr[0];
    float clip = max_norm > 0 ? (float)fmin(1.0, max_norm / ((double)nrm + 1e-6)) : 1.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (apply) {
            float gi = clip < 1.0f ? g[i] * clip : g[i];
            if (wd != 0.0f) gi += wd * p[i];
            float bi = buf[i] * mom + gi;
            buf[i] = bi;
            p[i] -= rate * bi;
        }
        g[i] = 0.0f;
    }
}

// d x of softmax: scale * y * (ct - sum(ct * y)) over rows of k; one block per row
extern "C" __global__ void softmax_grad(const float* y, const float* ct, float* out, int k,
                                        float scale) {
    long long row = blockIdx.x;
    const float* yr = y + row * k;
    const float* cr = ct + row * k;
    float* orow = out + row * k;
    float s = 0.0f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) s += cr[j] * yr[j];
    s = block_sum(s);
    for (int j = threadIdx.x; j < k; j += blockDim.x) orow[j] = (cr[j] - s) * yr[j] * scale;
}

// with s = sigmoid(gate): d up = ct * gate * s, d gate = ct * up * s * (1 + gate * (1 - s));
// rows of `width`, gate, up and ct rows gs, us, cs elements apart
extern "C" __global__ void silu_mul_grad(const float* g, const float* u, const float* ct,
                                         float* out, long long n, int width, long long gs,
                                         long long us, long long cs, int wrt_up) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / width;
        int j = (int)(i % width);
        float gi = g[r * gs + j], c = ct[r * cs + j];
        float s = 1.0f / (1.0f + expf(-gi));
        out[i] = wrt_up ? gi * s * c : (1.0f + (1.0f - s) * gi) * s * u[r * us + j] * c;
    }
}

// d x of rms_norm: with r = 1 / sqrt(mean(x^2) + eps), r * ct * w - x * r^3 * mean(ct * w * x)
extern "C" __global__ void rms_norm_grad_x(const float* x, const float* w, const float* ct,
                                           float* out, int d, float inv_d, float eps) {
    const float* xr = x + (size_t)blockIdx.x * d;
    const float* cr = ct + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        ss += xr[i] * xr[i];
        dot += cr[i] * w[i] * xr[i];
    }
    float r = 1.0f / sqrtf(block_sum(ss) * inv_d + eps);
    dot = block_sum(dot) * inv_d * r * r;
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = (cr[i] * w[i] - xr[i] * dot) * r;
}

// r[row] = 1 / sqrt(mean(x[row]^2) + eps); one block per row
extern "C" __global__ void rms_inverse(const float* x, float* r, int d, float inv_d, float eps) {
    const float* xr = x + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    if (threadIdx.x == 0) r[blockIdx.x] = 1.0f / sqrtf(ss * inv_d + eps);
}

// partial[c, j] = sum over rows of chunk c of ct[row, j] * x[row, j] * r[row] (d w of rms_norm,
// summed over chunks afterwards: a fixed order, so the same bits every run)
extern "C" __global__ void rms_norm_grad_w(const float* x, const float* ct, const float* r,
                                           float* partial, long long rows, int d, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    long long r0 = (long long)blockIdx.y * chunk;
    long long r1 = min(rows, r0 + chunk);
    float s = 0.0f;
    for (long long i = r0; i < r1; ++i) s += ct[i * d + j] * x[i * d + j] * r[i];
    partial[(long long)blockIdx.y * d + j] = s;
}

// flash_attention's scores (rows, t) -> probabilities in place, rows = (b, n, s, g) of
// scale * q k^T; the optional mask is (b, s, t); with `causal`, query i sees keys
// j <= i + t - s (the rest 0). saved 0: the row log-sum-exp of scale * x + mask is written to
// lse and the row normalised by its sum; saved 1: p = exp(scale * x + mask - lse[row])
extern "C" __global__ void flash_probs(float* x, const float* mask, float* lse, int s, int g,
                                       int n, int t, float scale, int causal, int saved) {
    long long row = blockIdx.x;
    int si = (int)((row / g) % s);
    long long b = row / ((long long)s * g * n);
    float* xr = x + row * t;
    const float* mr = mask ? mask + (b * s + si) * t : nullptr;
    int visible = causal ? min(t, si + (t - s) + 1) : t;
    float shift, inv = 1.0f;
    if (saved) {
        shift = lse[row];
    } else {
        float top = NEG_INF;
        for (int j = threadIdx.x; j < visible; j += blockDim.x)
            top = fmaxf(top, xr[j] * scale + (mr ? mr[j] : 0.0f));
        top = block_max(top);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < visible; j += blockDim.x)
            sum += expf(xr[j] * scale + (mr ? mr[j] : 0.0f) - top);
        sum = block_sum(sum);
        if (threadIdx.x == 0) lse[row] = top + logf(sum);
        shift = top;
        inv = 1.0f / sum;
    }
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        xr[j] = j < visible ? expf(xr[j] * scale + (mr ? mr[j] : 0.0f) - shift) * inv : 0.0f;
}

// flash_attention's score gradient in place of dp (rows, t): p * (dp - sum(dout * o)) * scale,
// the rows of dout and o `h` long
extern "C" __global__ void flash_dscores(const float* p, float* dp, const float* dout,
                                         const float* o, int t, int h, float scale) {
    long long row = blockIdx.x;
    float d = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) d += dout[row * h + i] * o[row * h + i];
    d = block_sum(d);
    const float* pr = p + row * t;
    float* dr = dp + row * t;
    for (int j = threadIdx.x; j < t; j += blockDim.x) dr[j] = (dr[j] - d) * pr[j] * scale;
}
