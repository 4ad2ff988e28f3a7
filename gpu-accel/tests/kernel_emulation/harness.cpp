// Runs the CUDA kernels of kernels/codec.cu on the host, for tests/kernel_emulation.rs.
//
// The CUDA keywords are defined away: __shared__ variables become function-level statics (shared by
// the threads of a block, as on a device), and each block runs as one std::thread per CUDA thread with a
// std::barrier for __syncthreads(). Blocks run one after another, which is one of the schedules a device
// may choose. What this cannot show: device-specific behaviour (memory model, shared-memory limits,
// NVRTC acceptance of the source).
//
// Usage: harness crc|lz4 GRID BLOCK INPUT OUTPUT
//   INPUT:  u32 n, then n times (u64 len, len bytes); all little-endian
//   OUTPUT: crc: n times u32 crc;  lz4: n times (u64 block_len, block_len bytes)

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
static thread_local Dim3 threadIdx;
static Dim3 blockIdx, blockDim, gridDim;
static std::barrier<>* block_barrier = nullptr;

#define __device__
#define __global__
#define __shared__ static
#define __syncthreads() block_barrier->arrive_and_wait()

#include "codec.cu"

static void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; b++) {
        blockIdx.x = b;
        std::barrier<> barrier(block);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++) {
            threads.emplace_back([t, &kernel] {
                threadIdx.x = t;
                kernel();
            });
        }
        for (auto& thread : threads) thread.join();
    }
}

static void fail(const char* what) {
    std::fprintf(stderr, "harness: %s\n", what);
    std::exit(2);
}

int main(int argc, char** argv) {
    if (argc != 6) fail("usage: harness crc|lz4 GRID BLOCK INPUT OUTPUT");
    const std::string mode = argv[1];
    const unsigned grid = std::strtoul(argv[2], nullptr, 10);
    const unsigned block = std::strtoul(argv[3], nullptr, 10);
    FILE* in = std::fopen(argv[4], "rb");
    if (!in) fail("cannot open input");
    u32 n = 0;
    if (std::fread(&n, 4, 1, in) != 1) fail("short input");
    std::vector<u8> data;
    std::vector<u64> offsets(n), lens(n);
    for (u32 i = 0; i < n; i++) {
        if (std::fread(&lens[i], 8, 1, in) != 1) fail("short input");
        offsets[i] = data.size();
        data.resize(data.size() + lens[i]);
        if (lens[i] && std::fread(data.data() + offsets[i], 1, lens[i], in) != lens[i]) fail("short input");
    }
    std::fclose(in);
    data.push_back(0);  // so that data.data() is valid for an all-empty batch

    FILE* out = std::fopen(argv[5], "wb");
    if (!out) fail("cannot open output");
    if (mode == "crc") {
        if (block > CRC_MAX_THREADS) fail("block too large for crc32_batch");
        std::vector<u32> crcs(n);
        launch(grid, block, [&] { crc32_batch(data.data(), offsets.data(), lens.data(), crcs.data(), n); });
        std::fwrite(crcs.data(), 4, n, out);
    } else if (mode == "lz4") {
        if (block > LZ4_THREADS) fail("block too large for lz4_compress_batch");
        std::vector<u8> blocks(data.size());
        std::vector<u64> block_lens(n);
        launch(grid, block, [&] {
            lz4_compress_batch(data.data(), offsets.data(), lens.data(), blocks.data(), block_lens.data(), n);
        });
        for (u32 i = 0; i < n; i++) {
            std::fwrite(&block_lens[i], 8, 1, out);
            std::fwrite(blocks.data() + offsets[i], 1, block_lens[i], out);
        }
    } else {
        fail("unknown mode");
    }
    std::fclose(out);
    return 0;
}
