//! The CUDA kernels, run on the host: `kernels/codec.cu` compiled as C++ by `tests/kernel_emulation/
//! harness.cpp` (CUDA keywords defined away, one std::thread per CUDA thread, a barrier for
//! `__syncthreads`). This checks the kernels' logic on every machine, GPU or not: the CRCs must equal
//! `crc32fast` for any block and grid size, and every LZ4 block must decode with `lz4_flex` to its chunk.
//! It does not check what only a device shows (NVRTC accepting the source, shared-memory limits, speed):
//! `tests/gpu.rs` does that where there is a GPU.
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`); without one the tests print "skipped" and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use common::noise;
use proptest::prelude::*;

/// Must equal `LZ4_MAX_CHUNK` in the kernel source (and `GPU_CHUNK_LEN` in src/cuda.rs).
const MAX_CHUNK: usize = 64 * 1024;

fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation")
}

/// The harness executable, built once per test run; `None` (after printing why) without a compiler.
fn harness() -> Option<&'static Path> {
    static HARNESS: OnceLock<Option<PathBuf>> = OnceLock::new();
    HARNESS
        .get_or_init(|| {
            let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            let dir = work_dir();
            std::fs::create_dir_all(&dir).expect("the test's temporary directory can be created");
            let exe = dir.join("harness");
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
            let output = Command::new(&cxx)
                .args(["-std=c++20", "-O2", "-pthread", "-I"])
                .arg(crate_dir.join("kernels"))
                .arg(crate_dir.join("tests/kernel_emulation/harness.cpp"))
                .arg("-o")
                .arg(&exe)
                .output();
            match output {
                Err(e) => {
                    println!("skipped: no C++ compiler to emulate the kernels ({cxx}: {e})");
                    None
                }
                Ok(o) => {
                    assert!(
                        o.status.success(),
                        "kernels/codec.cu does not compile as C++ with {cxx}:\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    Some(exe)
                }
            }
        })
        .as_deref()
}

/// Runs `mode` over `items` with the given grid and block size and returns the raw output.
fn run(exe: &Path, mode: &str, grid: usize, block: usize, items: &[Vec<u8>]) -> Vec<u8> {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let id = RUN.fetch_add(1, Ordering::Relaxed);
    let input = work_dir().join(format!("in-{}-{id}", std::process::id()));
    let output = work_dir().join(format!("out-{}-{id}", std::process::id()));
    let mut bytes = (items.len() as u32).to_le_bytes().to_vec();
    for item in items {
        bytes.extend_from_slice(&(item.len() as u64).to_le_bytes());
        bytes.extend_from_slice(item);
    }
    std::fs::write(&input, bytes).expect("input file written");
    let result = Command::new(exe)
        .args([mode, &grid.to_string(), &block.to_string()])
        .arg(&input)
        .arg(&output)
        .output()
        .expect("the harness runs");
    assert!(
        result.status.success(),
        "harness failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let out = std::fs::read(&output).expect("output file read");
    let _ = std::fs::remove_file(input);
    let _ = std::fs::remove_file(output);
    out
}

fn emulated_crcs(exe: &Path, grid: usize, block: usize, bufs: &[Vec<u8>]) -> Vec<u32> {
    run(exe, "crc", grid, block, bufs)
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunks_exact gives 4 bytes")))
        .collect()
}

/// Each chunk's block, or `None` where the kernel gave up (stored).
fn emulated_blocks(exe: &Path, grid: usize, chunks: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
    let out = run(exe, "lz4", grid, 4, chunks);
    let mut pos = 0;
    let mut blocks = Vec::new();
    for _ in chunks {
        let len = u64::from_le_bytes(out[pos..pos + 8].try_into().expect("8 bytes")) as usize;
        pos += 8;
        blocks.push((len > 0).then(|| out[pos..pos + len].to_vec()));
        pos += len;
    }
    assert_eq!(pos, out.len());
    blocks
}

/// Every block must be shorter than its chunk and decode to it.
fn check_blocks(chunks: &[Vec<u8>], blocks: &[Option<Vec<u8>>]) -> Result<(), String> {
    for (i, (chunk, block)) in chunks.iter().zip(blocks).enumerate() {
        let Some(block) = block else { continue };
        if block.len() >= chunk.len() {
            return Err(format!(
                "chunk {i}: block of {} bytes for {} bytes",
                block.len(),
                chunk.len()
            ));
        }
        let decoded = lz4_flex::block::decompress(block, chunk.len())
            .map_err(|e| format!("chunk {i} ({} bytes): lz4_flex rejects the block: {e}", chunk.len()))?;
        if &decoded != chunk {
            return Err(format!(
                "chunk {i} ({} bytes): the block decodes to different bytes",
                chunk.len()
            ));
        }
    }
    Ok(())
}

/// Text-like bytes: words from a small vocabulary, so that matches are short and frequent.
fn words(len: usize, seed: u64) -> Vec<u8> {
    const VOCABULARY: [&str; 8] = [
        "raft ", "log ", "entry ", "term ", "commit ", "index ", "leader ", "vote ",
    ];
    let picks = noise(len, seed);
    let mut text = Vec::with_capacity(len + 8);
    let mut i = 0;
    while text.len() < len {
        text.extend_from_slice(VOCABULARY[picks[i] as usize % 8].as_bytes());
        i += 1;
    }
    text.truncate(len);
    text
}

#[test]
fn emulated_crc32_equals_crc32fast_for_any_launch_shape() {
    let Some(exe) = harness() else { return };
    let sizes = [
        0usize, 1, 2, 3, 7, 255, 256, 257, 1000, 4095, 65_536, 65_537, 100_000, 300_003,
    ];
    let bufs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| noise(n, i as u64 + 1)).collect();
    let expected: Vec<u32> = bufs.iter().map(|b| crc32fast::hash(b)).collect();
    // One thread; odd shapes where segments are uneven or empty; fewer blocks than buffers (grid-stride);
    // the production shape (256 threads, one block per buffer).
    for (grid, block) in [(1, 1), (3, 7), (2, 256), (bufs.len(), 256)] {
        assert_eq!(
            emulated_crcs(exe, grid, block, &bufs),
            expected,
            "grid {grid}, block {block}"
        );
    }
}

#[test]
fn emulated_lz4_blocks_decode_with_lz4_flex() {
    let Some(exe) = harness() else { return };
    let mut chunks: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"short".to_vec(),
        vec![b'a'; 12],
        vec![b'a'; 13],
        vec![b'a'; 14],
        vec![0; 100],
        vec![0; MAX_CHUNK],           // one long match: many length bytes
        noise(MAX_CHUNK, 9),          // incompressible: given up
        b"abc".repeat(MAX_CHUNK / 3), // overlapping match with offset 3
        words(MAX_CHUNK, 5),          // many short matches
        words(1000, 6),
    ];
    // A long literal run (length bytes) followed by a match, and the reverse.
    let mut literals_then_match = noise(700, 11);
    literals_then_match.extend(std::iter::repeat_n(7u8, 2000));
    chunks.push(literals_then_match);
    let mut match_then_literals = vec![7u8; 2000];
    match_then_literals.extend(noise(700, 12));
    chunks.push(match_then_literals);
    // A match exactly at the end-of-block limits.
    for len in 13..40 {
        chunks.push(b"xyzw".repeat(10)[..len].to_vec());
    }
    // Repetition at a distance close to the 65535-byte offset limit.
    let mut far = noise(40_000, 13);
    far.extend_from_within(..25_000);
    chunks.push(far);

    for grid in [1, 2, chunks.len().div_ceil(4)] {
        let blocks = emulated_blocks(exe, grid, &chunks);
        check_blocks(&chunks, &blocks).unwrap_or_else(|e| panic!("grid {grid}: {e}"));
        // It must actually compress what is compressible, and give up on noise.
        assert!(
            blocks[6].as_ref().is_some_and(|b| b.len() < 400),
            "64 KiB of zeros: {:?}",
            blocks[6].as_ref().map(Vec::len)
        );
        assert!(blocks[8].as_ref().is_some_and(|b| b.len() < 400), "abcabc...");
        assert!(blocks[9].as_ref().is_some_and(|b| b.len() < MAX_CHUNK / 2), "text");
        assert!(blocks[7].is_none(), "noise cannot shrink");
        assert!(
            blocks[0].is_none() && blocks[1].is_none() && blocks[2].is_none(),
            "below 13 bytes nothing is tried"
        );
        assert!(
            blocks
                .last()
                .is_some_and(|b| b.as_ref().is_some_and(|b| b.len() < 42_000)),
            "a far match is found"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn emulated_kernels_agree_with_the_cpu(bufs in prop::collection::vec(common::buffer(), 1..6)) {
        let Some(exe) = harness() else { return Ok(()) };
        let chunks: Vec<Vec<u8>> = bufs.iter().flat_map(|b| b.chunks(MAX_CHUNK).map(<[u8]>::to_vec)).collect();
        prop_assume!(!chunks.is_empty());
        let blocks = emulated_blocks(exe, 1, &chunks);
        check_blocks(&chunks, &blocks).map_err(TestCaseError::fail)?;
        let expected: Vec<u32> = bufs.iter().map(|b| crc32fast::hash(b)).collect();
        prop_assert_eq!(emulated_crcs(exe, bufs.len(), 256, &bufs), expected);
    }
}
