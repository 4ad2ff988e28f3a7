// Kernels of basalt-gpu's CUDA backend, compiled at run time with NVRTC (see src/cuda.rs).
//
// No #include: NVRTC offers no standard headers by default, so the integer types are spelled out.
// The same file also compiles as C++ on the host (tests/kernel_emulation.rs defines the CUDA keywords
// and runs each block with one std::thread per CUDA thread), which is how the kernels are tested on
// machines without a GPU.
//
// crc32_batch:        CRC32 (IEEE, reflected polynomial 0xEDB88320, as crc32fast) of n buffers; one
//                     block per buffer, each thread hashes one contiguous segment, thread 0 joins the
//                     segment CRCs with crc32_combine arithmetic in GF(2)[x] / P(x).
// lz4_compress_batch: greedy LZ4 block compressor, one thread per chunk of at most 64 KiB, the hash
//                     table of each thread in shared memory. Its output is a standard LZ4 block
//                     (lz4_flex::block::decompress reads it), or length 0 when it would not be shorter
//                     than the input (the host then stores the chunk).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define CRC_POLY 0xEDB88320u
// Most threads per block for crc32_batch (the host launches at most this many).
#define CRC_MAX_THREADS 256

// Threads per block for lz4_compress_batch (the host launches exactly this many): 4 tables of
// 2^12 u16 entries = 32 KiB of static shared memory, under the 48 KiB every device allows.
#define LZ4_THREADS 4
#define LZ4_HASH_LOG 12
#define LZ4_HASH_SIZE (1u << LZ4_HASH_LOG)
// Largest chunk: positions in the hash table are u16, and LZ4 offsets are at most 65535.
#define LZ4_MAX_CHUNK 65536u
#define LZ4_MIN_MATCH 4u
// The last 5 bytes of a block are literals, and the last match starts at least 12 bytes before the end.
#define LZ4_LAST_LITERALS 5u
#define LZ4_MFLIMIT 12u
#define LZ4_MAX_OFFSET 65535u

// ---------------------------------------------------------------------------------------------------
// CRC32
//
// Polynomials are held in reflected order: bit 31 is the coefficient of x^0, bit 0 that of x^31.

// a * b mod P.
__device__ u32 gf2_mulmod(u32 a, u32 b) {
    u32 product = 0;
    for (u32 i = 0; i < 32; i++) {
        if (a & (0x80000000u >> i)) {  // the coefficient of x^i in a
            product ^= b;
        }
        b = (b & 1u) ? (b >> 1) ^ CRC_POLY : b >> 1;  // b *= x
    }
    return product;
}

// x^(8 * bytes) mod P, from x2k[k] = x^(2^k) mod P.
__device__ u32 x_pow_8n(const u32* x2k, u64 bytes) {
    u32 result = 0x80000000u;  // x^0
    u64 exponent = bytes << 3;
    for (u32 k = 0; exponent != 0; k++, exponent >>= 1) {
        if (exponent & 1u) {
            result = gf2_mulmod(x2k[k], result);
        }
    }
    return result;
}

__device__ u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

// buffer i is data[offsets[i] .. offsets[i] + lens[i]); crcs[i] receives its CRC32.
extern "C" __global__ void crc32_batch(const u8* data, const u64* offsets, const u64* lens, u32* crcs, u32 n) {
    __shared__ u32 table[256];
    __shared__ u32 x2k[64];
    __shared__ u32 partial[CRC_MAX_THREADS];
    const u32 t = threadIdx.x;
    const u32 threads = blockDim.x;

    for (u32 i = t; i < 256; i += threads) {
        u32 c = i;
        for (u32 k = 0; k < 8; k++) {
            c = (c & 1u) ? (c >> 1) ^ CRC_POLY : c >> 1;
        }
        table[i] = c;
    }
    if (t == 0) {
        u32 p = 0x40000000u;  // x^1
        for (u32 k = 0; k < 64; k++) {
            x2k[k] = p;
            p = gf2_mulmod(p, p);
        }
    }
    __syncthreads();

    // Every thread of a block runs the same iterations, so the barriers below are reached by all.
    for (u64 b = blockIdx.x; b < n; b += gridDim.x) {
        const u8* buf = data + offsets[b];
        const u64 len = lens[b];
        const u64 per = (len + threads - 1) / threads;
        const u64 begin = min_u64(len, per * t);
        const u64 end = min_u64(len, begin + per);
        u32 c = 0xFFFFFFFFu;
        for (u64 i = begin; i < end; i++) {
            c = table[(c ^ buf[i]) & 0xFFu] ^ (c >> 8);
        }
        partial[t] = ~c;  // the CRC32 of this thread's segment (0 for an empty one)
        __syncthreads();
        if (t == 0) {
            // crc(A || B) = crc(A) * x^(8 |B|) + crc(B)  (mod P). All segments but the last non-empty
            // one are `per` bytes long, so their shift is computed once.
            const u32 full_shift = x_pow_8n(x2k, per);
            u32 crc = partial[0];
            for (u32 s = 1; s < threads; s++) {
                const u64 s_begin = min_u64(len, per * s);
                const u64 s_len = min_u64(len, s_begin + per) - s_begin;
                if (s_len != 0) {
                    const u32 shift = s_len == per ? full_shift : x_pow_8n(x2k, s_len);
                    crc = gf2_mulmod(shift, crc) ^ partial[s];
                }
            }
            crcs[b] = crc;
        }
        __syncthreads();  // partial[] is reused for the next buffer
    }
}

// ---------------------------------------------------------------------------------------------------
// LZ4 block compression

__device__ u32 read32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

__device__ u32 lz4_hash(u32 v) { return (v * 2654435761u) >> (32 - LZ4_HASH_LOG); }

// The extra length bytes after a token nibble of 15: 255s, then the remainder.
__device__ u8* put_length(u8* op, u32 rest) {
    while (rest >= 255) {
        *op++ = 255;
        rest -= 255;
    }
    *op++ = (u8)rest;
    return op;
}

// Worst-case bytes of a sequence with `literals` literals and a match (when `with_match`).
__device__ u32 sequence_bound(u32 literals, u32 match_len, bool with_match) {
    u32 bound = 1 + literals / 255 + 1 + literals;  // token, literal length bytes, literals
    if (with_match) {
        bound += 2 + match_len / 255 + 1;  // offset, match length bytes
    }
    return bound;
}

// Compresses src[0, len) (13 <= len <= LZ4_MAX_CHUNK) into dst, writing at most `cap` bytes.
// Returns the block's length, or 0 when it does not fit in `cap`.
__device__ u32 lz4_compress_chunk(const u8* src, u32 len, u8* dst, u32 cap, u16* table) {
    for (u32 i = 0; i < LZ4_HASH_SIZE; i++) {
        table[i] = 0;  // position 0: a wrong guess is caught by comparing the bytes
    }
    u8* op = dst;
    const u8* const out_end = dst + cap;
    u32 anchor = 0;  // first byte not yet emitted
    u32 ip = 0;
    u32 misses = 0;  // positions tried since the last match
    const u32 match_end_limit = len - LZ4_LAST_LITERALS;
    while (ip + LZ4_MFLIMIT <= len) {
        const u32 seq = read32(src + ip);
        const u32 h = lz4_hash(seq);
        const u32 candidate = table[h];
        table[h] = (u16)ip;  // ip < 65536 because len <= 65536 and ip <= len - 12
        if (candidate < ip && ip - candidate <= LZ4_MAX_OFFSET && read32(src + candidate) == seq) {
            u32 match_len = LZ4_MIN_MATCH;
            while (ip + match_len < match_end_limit && src[candidate + match_len] == src[ip + match_len]) {
                match_len++;
            }
            const u32 literals = ip - anchor;
            if (sequence_bound(literals, match_len, true) > (u32)(out_end - op)) {
                return 0;
            }
            const u32 ml = match_len - LZ4_MIN_MATCH;
            u8* token = op++;
            *token = (u8)(((literals < 15 ? literals : 15) << 4) | (ml < 15 ? ml : 15));
            if (literals >= 15) {
                op = put_length(op, literals - 15);
            }
            for (u32 i = 0; i < literals; i++) {
                *op++ = src[anchor + i];
            }
            const u32 offset = ip - candidate;
            *op++ = (u8)(offset & 0xFFu);
            *op++ = (u8)(offset >> 8);
            if (ml >= 15) {
                op = put_length(op, ml - 15);
            }
            ip += match_len;
            anchor = ip;
            misses = 0;
        } else {
            // Step one byte further every 64 misses in a row, so that incompressible data is skipped
            // quickly while a match after a long literal run is still found.
            ip += 1 + (misses++ >> 6);
        }
    }
    const u32 literals = len - anchor;
    if (sequence_bound(literals, 0, false) > (u32)(out_end - op)) {
        return 0;
    }
    *op++ = (u8)((literals < 15 ? literals : 15) << 4);
    if (literals >= 15) {
        op = put_length(op, literals - 15);
    }
    for (u32 i = 0; i < literals; i++) {
        *op++ = src[anchor + i];
    }
    return (u32)(op - dst);
}

// Chunk i is in[offsets[i] .. offsets[i] + lens[i]); its block is written to out at the same offset
// (out is as long as in: a block is only kept when shorter than its chunk) and its length to out_lens[i]
// (0: not compressible, store the chunk).
extern "C" __global__ void lz4_compress_batch(const u8* in, const u64* offsets, const u64* lens, u8* out,
                                              u64* out_lens, u32 n) {
    __shared__ u16 tables[LZ4_THREADS][LZ4_HASH_SIZE];
    u16* table = tables[threadIdx.x];
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < n; c += stride) {
        const u64 len = lens[c];
        u32 written = 0;
        if (len >= LZ4_MFLIMIT + 1 && len <= LZ4_MAX_CHUNK) {
            written = lz4_compress_chunk(in + offsets[c], (u32)len, out + offsets[c], (u32)len - 1, table);
        }
        out_lens[c] = written;
    }
}
