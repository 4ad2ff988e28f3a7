//! The CUDA backend (cargo feature `cuda`): CRC32 and LZ4 compression of whole batches on an NVIDIA GPU.
//!
//! **Loading.** `cudarc` is built with `dynamic-loading`: no CUDA library is linked, so the feature builds
//! on machines without a CUDA toolkit, and the driver (`libcuda`) and NVRTC (`libnvrtc`) are opened at run
//! time. cudarc *panics* when it cannot open a library or find a symbol, so [`CudaBackend::new`]
//! 1. first asks cudarc whether each library can be opened at all (`is_culib_present`, which only tries
//!    to `dlopen` the candidate names), and returns [`CodecError::GpuUnavailable`] if not;
//! 2. then opens the device, compiles the kernels with NVRTC for the device's compute capability and loads
//!    them, inside `catch_unwind`, so that any remaining panic in the bindings (a driver too old for a
//!    symbol, say) also becomes `GpuUnavailable` instead of unwinding into the caller.
//!
//! Every later device operation also runs inside `catch_unwind`; after a panic the backend marks itself
//! broken and answers every further call with [`CodecError::Gpu`] without touching the device again
//! (the dispatcher then uses the CPU). Device operations are serialised by a mutex: one stream, one batch
//! at a time.
//!
//! **Kernels** (`kernels/codec.cu`, compiled by NVRTC at start-up):
//! - `crc32_batch`: one block per buffer, the block's threads hash contiguous segments and thread 0 joins
//!   the segment CRCs with CRC combination arithmetic; equal to `crc32fast` by construction and by test;
//! - `lz4_compress_batch`: a greedy LZ4 block compressor, one thread per chunk of at most
//!   [`GPU_CHUNK_LEN`] bytes, emitting standard LZ4 blocks that the CPU decoder (`lz4_flex`) reads.
//!
//! **Encoding** uploads the batch once, compresses every chunk, computes the CRC of every chunk and of
//! every compressed block on the device, copies back, and writes ordinary frames (one per 64 KiB chunk,
//! linked by the `continues` flag) on the host. A chunk the GPU could not shrink is stored. The host never
//! trusts a device length for slicing without checking it. Nothing is decompressed to double-check the
//! GPU's output: the receiver's end-to-end CRC check would catch a compressor bug, and the kernels are
//! tested against the CPU on every run of the test suite (`tests/kernel_emulation.rs` runs them on the
//! host; `tests/gpu.rs` on a device when there is one).
//!
//! **Decoding** runs on the CPU ([`CpuBackend`], all cores): there is no GPU LZ4 decoder.
//!
//! A batch must fit in device memory twice (input and compressed output); a larger one fails with
//! [`CodecError::Gpu`], which the dispatcher answers by using the CPU when it chose the GPU itself.
#![allow(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::batch::{finish_batch, frame_count, plan_chunks, BATCH_HEADER_LEN};
use crate::cpu::CpuBackend;
use crate::error::CodecError;
use crate::frame::{push_frame, CodecId, FrameHeader, FRAME_HEADER_LEN};
use crate::{Backend, BackendKind};

/// The CUDA C source of the kernels.
const KERNELS: &str = include_str!("../kernels/codec.cu");

/// Bytes per frame when the GPU encodes: one LZ4 chunk per CUDA thread. Equal to `LZ4_MAX_CHUNK` in the
/// kernel source (hash-table positions are 16-bit).
pub const GPU_CHUNK_LEN: usize = 64 * 1024;
/// Threads per block of `crc32_batch`; at most `CRC_MAX_THREADS` in the kernel source.
const CRC_THREADS: u32 = 256;
/// Threads per block of `lz4_compress_batch`; exactly `LZ4_THREADS` in the kernel source.
const LZ4_THREADS: u32 = 4;
/// Most blocks per launch; the kernels' grid-stride loops cover any number of buffers.
const MAX_GRID: usize = 65_535;
/// Buffers at least this long on average are copied to the device one by one; smaller ones are first
/// gathered on the host, because every copy costs a driver call.
const DIRECT_COPY_MIN: usize = 1 << 20;

/// The CUDA backend. Construct with [`CudaBackend::new`]; an `Err` means "use the CPU".
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    crc32: CudaFunction,
    lz4: CudaFunction,
    device: String,
    /// Serialises device work: one batch at a time on the one stream.
    lock: Mutex<()>,
    /// Set after a panic in the bindings; the device is not touched again.
    broken: AtomicBool,
    /// Decoding runs here; created on first use.
    cpu: OnceLock<CpuBackend>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device)
            .field("broken", &self.broken.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens device 0 and compiles the kernels. Returns [`CodecError::GpuUnavailable`] (never panics) when
    /// the driver or NVRTC is missing, there is no device, or the kernels cannot be built.
    pub fn new() -> Result<Self, CodecError> {
        Self::with_device(0)
    }

    /// Like [`CudaBackend::new`], for device `ordinal`.
    pub fn with_device(ordinal: usize) -> Result<Self, CodecError> {
        // SAFETY: `is_culib_present` only `dlopen`s the candidate file names of the library and closes
        // them again; opening the NVIDIA driver or NVRTC runs no initialisation beyond their constructors.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CodecError::GpuUnavailable(
                "the CUDA driver library (libcuda) cannot be loaded".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CodecError::GpuUnavailable(
                "the NVRTC library (libnvrtc), needed to compile the kernels, cannot be loaded".into(),
            ));
        }
        // AssertUnwindSafe: on a panic nothing built inside the closure survives it.
        match catch_unwind(AssertUnwindSafe(|| Self::open(ordinal))) {
            Ok(Ok(backend)) => Ok(backend),
            Ok(Err(e)) => Err(CodecError::GpuUnavailable(e.to_string())),
            Err(panic) => Err(CodecError::GpuUnavailable(format!(
                "the CUDA bindings panicked while opening device {ordinal}: {}",
                panic_text(&*panic)
            ))),
        }
    }

    fn open(ordinal: usize) -> Result<Self, CodecError> {
        let ctx = CudaContext::new(ordinal).map_err(driver("open the device"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("query the compute capability"))?;
        let options = CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            name: Some("basalt_codec.cu".into()),
            ..CompileOptions::default()
        };
        let ptx = compile_ptx_with_opts(KERNELS, options).map_err(|e| CodecError::Gpu {
            op: "compile the kernels with NVRTC",
            detail: e.to_string(),
        })?;
        let module = ctx.load_module(ptx).map_err(driver("load the kernels"))?;
        let crc32 = module
            .load_function("crc32_batch")
            .map_err(driver("find kernel crc32_batch"))?;
        let lz4 = module
            .load_function("lz4_compress_batch")
            .map_err(driver("find kernel lz4_compress_batch"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        Ok(CudaBackend {
            stream: ctx.default_stream(),
            crc32,
            lz4,
            device: format!("CUDA device {ordinal}: {name} (compute capability {major}.{minor})"),
            lock: Mutex::new(()),
            broken: AtomicBool::new(false),
            cpu: OnceLock::new(),
        })
    }

    /// Which device this is, for logs.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Runs device work `work` alone on the device, turning a panic in the bindings into an error.
    fn on_device<T>(&self, op: &'static str, work: impl FnOnce() -> Result<T, CodecError>) -> Result<T, CodecError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(CodecError::Gpu {
                op,
                detail: "the device backend is disabled after an earlier panic in the CUDA bindings".into(),
            });
        }
        // The mutex guards no data (only the device's use), so a poisoned lock is as good as any.
        let _turn = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // AssertUnwindSafe: after a panic the backend is marked broken and never uses the device again,
        // and callers discard whatever the closure had written.
        catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
            self.broken.store(true, Ordering::Release);
            Err(CodecError::Gpu {
                op,
                detail: format!("the CUDA bindings panicked: {}", panic_text(&*panic)),
            })
        })
    }

    /// Copies `bufs` back to back into a new device buffer of `total` (> 0) bytes.
    fn upload(&self, bufs: &[&[u8]], total: usize) -> Result<CudaSlice<u8>, CodecError> {
        let mut dev = self
            .stream
            .alloc_zeros::<u8>(total)
            .map_err(driver("allocate device memory"))?;
        if total / bufs.len().max(1) >= DIRECT_COPY_MIN {
            let mut pos = 0;
            for buf in bufs.iter().filter(|b| !b.is_empty()) {
                let mut dst = dev.slice_mut(pos..pos + buf.len());
                self.stream
                    .memcpy_htod(*buf, &mut dst)
                    .map_err(driver("copy to the device"))?;
                pos += buf.len();
            }
        } else {
            self.stream
                .memcpy_htod(&bufs.concat(), &mut dev)
                .map_err(driver("copy to the device"))?;
        }
        Ok(dev)
    }

    /// Launches `crc32_batch` over `n` buffers of `data` described by `offsets` and `lens`.
    fn launch_crc32(
        &self,
        data: &CudaSlice<u8>,
        offsets: &CudaSlice<u64>,
        lens: &CudaSlice<u64>,
        crcs: &mut CudaSlice<u32>,
        n: u32,
    ) -> Result<(), CodecError> {
        let cfg = launch_config(n as usize, CRC_THREADS);
        // SAFETY: the arguments match `crc32_batch(const u8*, const u64*, const u64*, u32*, u32)` in
        // kernels/codec.cu; `offsets`, `lens` and `crcs` hold `n` entries; every range offsets[i]..+lens[i]
        // lies inside `data` (callers build them from one layout, a compressed length never exceeds its
        // chunk's); blockDim is CRC_THREADS <= CRC_MAX_THREADS, the size of the kernel's shared arrays.
        unsafe {
            self.stream
                .launch_builder(&self.crc32)
                .arg(data)
                .arg(offsets)
                .arg(lens)
                .arg(crcs)
                .arg(&n)
                .launch(cfg)
        }
        .map_err(driver("launch crc32_batch"))?;
        Ok(())
    }

    fn checksum_on_device(&self, bufs: &[&[u8]]) -> Result<Vec<u32>, CodecError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(vec![0; bufs.len()]); // the CRC32 of no bytes
        }
        let n = u32::try_from(bufs.len()).map_err(|_| CodecError::Gpu {
            op: "checksum",
            detail: "more than 2^32 buffers in one batch".into(),
        })?;
        let (offsets, lens) = layout(bufs.iter().map(|b| b.len()));
        let data = self.upload(bufs, total)?;
        let d_offsets = self.stream.clone_htod(&offsets).map_err(driver("copy to the device"))?;
        let d_lens = self.stream.clone_htod(&lens).map_err(driver("copy to the device"))?;
        let mut d_crcs = self
            .stream
            .alloc_zeros::<u32>(bufs.len())
            .map_err(driver("allocate device memory"))?;
        self.launch_crc32(&data, &d_offsets, &d_lens, &mut d_crcs, n)?;
        let crcs = self
            .stream
            .clone_dtoh(&d_crcs)
            .map_err(driver("copy from the device"))?;
        self.stream.synchronize().map_err(driver("synchronize"))?;
        Ok(crcs)
    }

    fn encode_on_device(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let chunks = plan_chunks(bufs, GPU_CHUNK_LEN);
        let count = frame_count(chunks.len())?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Chunks are consecutive pieces of the buffers in order, so they tile the uploaded bytes.
        let (offsets, lens) = layout(chunks.iter().map(|c| c.data.len()));
        let device = if total == 0 {
            None
        } else {
            Some(self.compress_chunks(bufs, total, &offsets, &lens, count)?)
        };

        let start = out.len();
        out.reserve(BATCH_HEADER_LEN + chunks.len() * FRAME_HEADER_LEN + total);
        out.resize(start + BATCH_HEADER_LEN, 0);
        for (i, chunk) in chunks.iter().enumerate() {
            // GPU_CHUNK_LEN bounds every chunk, so its length fits in a u32.
            let raw_len = chunk.data.len() as u32;
            let mut header = FrameHeader {
                codec: CodecId::Stored,
                continues: chunk.continues,
                raw_len,
                payload_len: raw_len,
                raw_crc: 0,
                payload_crc: 0,
            };
            let Some(d) = &device else {
                push_frame(out, &header, chunk.data); // an empty chunk: CRC32 0
                continue;
            };
            header.raw_crc = d.raw_crcs[i];
            header.payload_crc = d.raw_crcs[i];
            let block_len = d.block_lens[i];
            // The kernel promises 0 or a length below the chunk's; check rather than trust it.
            if block_len > 0 && block_len < lens[i] {
                let at = offsets[i] as usize;
                header.codec = CodecId::Lz4Block;
                header.payload_len = block_len as u32;
                header.payload_crc = d.block_crcs[i];
                push_frame(out, &header, &d.blocks[at..at + block_len as usize]);
            } else {
                push_frame(out, &header, chunk.data);
            }
        }
        finish_batch(out, start, count);
        Ok(())
    }

    /// Compresses and checksums every chunk on the device; see [`DeviceOutput`].
    fn compress_chunks(
        &self,
        bufs: &[&[u8]],
        total: usize,
        offsets: &[u64],
        lens: &[u64],
        n: u32,
    ) -> Result<DeviceOutput, CodecError> {
        let count = offsets.len();
        let alloc = driver("allocate device memory");
        let data = self.upload(bufs, total)?;
        let d_offsets = self.stream.clone_htod(offsets).map_err(driver("copy to the device"))?;
        let d_lens = self.stream.clone_htod(lens).map_err(driver("copy to the device"))?;
        let mut d_blocks = self.stream.alloc_zeros::<u8>(total).map_err(&alloc)?;
        let mut d_block_lens = self.stream.alloc_zeros::<u64>(count).map_err(&alloc)?;
        let mut d_raw_crcs = self.stream.alloc_zeros::<u32>(count).map_err(&alloc)?;
        let mut d_block_crcs = self.stream.alloc_zeros::<u32>(count).map_err(&alloc)?;

        let cfg = launch_config((count).div_ceil(LZ4_THREADS as usize), LZ4_THREADS);
        // SAFETY: the arguments match `lz4_compress_batch(const u8*, const u64*, const u64*, u8*, u64*, u32)`
        // in kernels/codec.cu; `d_offsets`, `d_lens`, `d_block_lens` hold `n` entries; each chunk range
        // lies inside `data`, and `d_blocks` has the same length, so the kernel's writes (at most len - 1
        // bytes at the chunk's offset) stay inside it; blockDim is exactly LZ4_THREADS, the number of
        // hash tables the kernel keeps in shared memory.
        unsafe {
            self.stream
                .launch_builder(&self.lz4)
                .arg(&data)
                .arg(&d_offsets)
                .arg(&d_lens)
                .arg(&mut d_blocks)
                .arg(&mut d_block_lens)
                .arg(&n)
                .launch(cfg)
        }
        .map_err(driver("launch lz4_compress_batch"))?;
        self.launch_crc32(&data, &d_offsets, &d_lens, &mut d_raw_crcs, n)?;
        // The blocks: at each chunk's offset, of the length the compressor wrote (0 when it gave up).
        self.launch_crc32(&d_blocks, &d_offsets, &d_block_lens, &mut d_block_crcs, n)?;

        let from_device = driver("copy from the device");
        let output = DeviceOutput {
            blocks: self.stream.clone_dtoh(&d_blocks).map_err(&from_device)?,
            block_lens: self.stream.clone_dtoh(&d_block_lens).map_err(&from_device)?,
            raw_crcs: self.stream.clone_dtoh(&d_raw_crcs).map_err(&from_device)?,
            block_crcs: self.stream.clone_dtoh(&d_block_crcs).map_err(&from_device)?,
        };
        self.stream.synchronize().map_err(driver("synchronize"))?;
        Ok(output)
    }

    fn cpu(&self) -> &CpuBackend {
        self.cpu
            .get_or_init(|| CpuBackend::all_cores().unwrap_or_else(|_| CpuBackend::single_threaded()))
    }
}

/// What the device computed for every chunk of a batch.
struct DeviceOutput {
    /// The compressed blocks, each at its chunk's offset.
    blocks: Vec<u8>,
    /// Length of each block; 0 where the chunk did not shrink.
    block_lens: Vec<u64>,
    raw_crcs: Vec<u32>,
    block_crcs: Vec<u32>,
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Gpu
    }

    fn checksum_batch(&self, bufs: &[&[u8]]) -> Result<Vec<u32>, CodecError> {
        if bufs.is_empty() {
            return Ok(Vec::new());
        }
        self.on_device("checksum", || self.checksum_on_device(bufs))
    }

    fn encode_batch(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<usize, CodecError> {
        let start = out.len();
        let result = self.on_device("encode", || self.encode_on_device(bufs, out));
        match result {
            Ok(()) => Ok(out.len() - start),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Decodes on the CPU: there is no GPU LZ4 decoder.
    fn decode_batch_into(&self, batch: &[u8], out: &mut Vec<u8>) -> Result<Vec<Range<usize>>, CodecError> {
        self.cpu().decode_batch_into(batch, out)
    }
}

/// Offsets and lengths of consecutive pieces of the given lengths, laid back to back from 0.
fn layout(lengths: impl Iterator<Item = usize>) -> (Vec<u64>, Vec<u64>) {
    let mut pos = 0u64;
    lengths
        .map(|len| {
            let offset = pos;
            pos += len as u64;
            (offset, len as u64)
        })
        .unzip()
}

fn launch_config(blocks: usize, threads: u32) -> LaunchConfig {
    // At most MAX_GRID (< u32::MAX) blocks.
    let blocks = blocks.clamp(1, MAX_GRID) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn driver(op: &'static str) -> impl Fn(DriverError) -> CodecError {
    move |e| CodecError::Gpu {
        op,
        detail: e.to_string(),
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
