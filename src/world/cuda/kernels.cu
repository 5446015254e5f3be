// The world model's non-GEMM work on the GPU (src/world/cuda/mod.rs runs them; cuBLAS does the
// GEMMs). Compiled at load time by NVRTC for the device's own architecture, so this file uses
// nothing beyond the CUDA built-ins: no headers, no templates across the boundary.
//
// Activations are row-major [rows, cols] float arrays, one row per (sequence, position), every
// sequence padded to max_seq rows. Each kernel's comment says its launch shape; the host side
// (mod.rs, `Kernels`) is the only caller and keeps to it.

#define WARP 32
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// The sum (or max) of `v` over the block, returned to every thread. `scratch` holds one float
// per warp; blockDim.x must be a multiple of 32.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// x[row] = embed[ids[row]] + positions[row % max_seq]. Grid: one block per row.
extern "C" __global__ void embed(const unsigned int* ids, const float* table, const float* positions,
                                 float* x, int max_seq, int dim) {
    const int row = blockIdx.x;
    const float* e = table + (size_t)ids[row] * dim;
    const float* p = positions + (size_t)(row % max_seq) * dim;
    float* out = x + (size_t)row * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[j] = e[j] + p[j];
}

// LayerNorm of each row with biased variance, two passes as the CPU does:
//   x[row] += pending (when `pending` is not null, and written back: the bias of the GEMM that
//             last added into the residual stream, folded in here to save a launch)
//   out[row] = (x - mean) / sqrt(var + eps) * weight + bias
// Grid: one block per row.
extern "C" __global__ void layer_norm(float* x, const float* pending, const float* weight,
                                      const float* bias, float* out, int dim, float eps) {
    __shared__ float scratch[WARP];
    float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = out + (size_t)blockIdx.x * dim;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = xr[j];
        if (pending != nullptr) {
            v += pending[j];
            xr[j] = v;
        }
        sum += v;
    }
    const float mean = block_sum(sum, scratch) / dim;
    float sq = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float d = xr[j] - mean;
        sq += d * d;
    }
    const float inv_std = 1.0f / sqrtf(block_sum(sq, scratch) / dim + eps);  // as the CPU rounds it
    for (int j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = (xr[j] - mean) * inv_std * weight[j] + bias[j];
}

// Self-attention of one query row in one head, over all max_seq key rows of its sequence (no
// mask: the models were trained to attend over padding, as the spec fixes it).
//   qkv:  [batch * max_seq, 3 * dim], q | k | v, before their bias (bqkv, 3 * dim)
//   out:  [batch * max_seq, dim], the heads side by side
// Grid: (max_seq, heads, batch); block: a multiple of 32 threads.
// Shared memory: head_dim (q) + max_seq (scores) + warps * head_dim (partial outputs) floats.
extern "C" __global__ void attention(const float* qkv, const float* bqkv, float* out, int max_seq,
                                     int dim, int head_dim, float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[WARP];
    const int query = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const size_t stride = 3 * (size_t)dim;
    const float* rows = qkv + (size_t)seq * max_seq * stride;
    const int q_col = head * head_dim, k_col = dim + q_col, v_col = 2 * dim + q_col;
    float* q = smem;
    float* scores = q + head_dim;
    float* partial = scores + max_seq;

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        q[d] = rows[query * stride + q_col + d] + bqkv[q_col + d];
    __syncthreads();

    // One warp per key row: the lanes read the row's head_dim values side by side.
    for (int key = warp; key < max_seq; key += warps) {
        const float* k = rows + key * stride + k_col;
        float dot = 0.0f;
        for (int d = lane; d < head_dim; d += WARP) dot += q[d] * (k[d] + bqkv[k_col + d]);
        dot = warp_sum(dot);
        if (lane == 0) scores[key] = dot;
    }
    __syncthreads();

    // softmax(scale * scores), the maximum subtracted first.
    float local_max = NEG_INF;
    for (int j = threadIdx.x; j < max_seq; j += blockDim.x) local_max = fmaxf(local_max, scores[j]);
    const float max = block_max(local_max, scratch);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < max_seq; j += blockDim.x) {
        const float p = expf((scores[j] - max) * scale);
        scores[j] = p;
        local_sum += p;
    }
    const float inv_sum = 1.0f / block_sum(local_sum, scratch);  // also orders the writes above

    // Each warp sums its share of the key rows; the lanes hold the output columns.
    for (int d = lane; d < head_dim; d += WARP) {
        float acc = 0.0f;
        for (int key = warp; key < max_seq; key += warps)
            acc += scores[key] * (rows[key * stride + v_col + d] + bqkv[v_col + d]);
        partial[warp * head_dim + d] = acc;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < warps; ++w) acc += partial[w * head_dim + d];
        out[((size_t)seq * max_seq + query) * dim + q_col + d] = acc * inv_sum;
    }
}

#define ACT_NONE 0
#define ACT_GELU 1
#define ACT_RELU 2

// y = act(y + bias[col]) over a [rows, cols] array, in place. GELU is the tanh form.
// Grid: enough blocks to cover rows * cols elements.
extern "C" __global__ void bias_act(float* y, const float* bias, int cols, long long total, int act) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float v = y[i] + bias[i % cols];
        if (act == ACT_GELU) {
            v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        } else if (act == ACT_RELU) {
            v = fmaxf(v, 0.0f);
        }
        y[i] = v;
    }
}

// out[seq] = the mean of x over the sequence's real rows, summed in double as the CPU does.
// Grid: one block per sequence.
extern "C" __global__ void mean_pool(const float* x, const int* lens, float* out, int max_seq, int dim) {
    const int seq = blockIdx.x, len = lens[seq];
    const float* rows = x + (size_t)seq * max_seq * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        double sum = 0.0;
        for (int r = 0; r < len; ++r) sum += rows[(size_t)r * dim + j];
        out[(size_t)seq * dim + j] = (float)(sum / len);
    }
}
