//! The dispatcher: picks a backend for each batch, runs it, and counts what was done where.
//!
//! The rule ([`choose_backend`]): with [`BackendChoice::Auto`], a batch goes to the GPU when a GPU
//! backend is present and the batch holds at least `gpu_crossover_bytes`; everything else goes to the CPU.
//! Small batches stay on the CPU because moving them to the device and back costs more than coding them.
//! The crossover defaults to [`DEFAULT_GPU_CROSSOVER_BYTES`], a placeholder until `basalt-bench codec`
//! has measured the real crossover on a machine with a GPU.
//!
//! [`BackendChoice::Cpu`] and [`BackendChoice::Gpu`] force a backend. Forcing the GPU where there is none
//! fails in [`Dispatcher::new`], never later and never with a panic. A GPU failure at run time (a driver
//! error, device memory exhausted) is returned as an error when the GPU was forced; when the dispatcher
//! chose the GPU itself it redoes the batch on the CPU and counts a fallback.
//!
//! Decoding always runs on the CPU: there is no GPU LZ4 decoder (LZ4 decoding is a memory copy with
//! bookkeeping, fast on CPUs), and frames encoded on either backend decode the same way.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crate::batch::DecodedBatch;
use crate::cpu::CpuBackend;
use crate::error::CodecError;
use crate::metrics::{CodecMetrics, Op};
use crate::{Backend, BackendKind};

/// Default batch size (bytes) from which [`BackendChoice::Auto`] sends a batch to the GPU: 8 MiB.
/// To be taken from `basalt-bench codec`; no GPU measured yet.
pub const DEFAULT_GPU_CROSSOVER_BYTES: u64 = 8 << 20;

/// Which backend the dispatcher may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendChoice {
    /// The GPU for batches at or above the crossover when a device is present, the CPU otherwise.
    #[default]
    Auto,
    /// Always the CPU; no GPU is even looked for.
    Cpu,
    /// Always the GPU; construction fails without one.
    Gpu,
}

/// How many threads the CPU backend uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpuThreads {
    /// The calling thread only.
    Single,
    /// One per core.
    #[default]
    AllCores,
    /// Exactly this many (0 and 1 mean [`CpuThreads::Single`]).
    Fixed(usize),
}

/// The dispatcher's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DispatcherConfig {
    pub choice: BackendChoice,
    /// Batches of at least this many bytes go to the GPU under [`BackendChoice::Auto`].
    pub gpu_crossover_bytes: u64,
    pub cpu_threads: CpuThreads,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            choice: BackendChoice::Auto,
            gpu_crossover_bytes: DEFAULT_GPU_CROSSOVER_BYTES,
            cpu_threads: CpuThreads::AllCores,
        }
    }
}

/// The backend for a batch of `batch_bytes` bytes. A forced GPU is only ever asked for when one is
/// present ([`Dispatcher::new`] refuses otherwise), so `Gpu` with `gpu_available == false` answers `Cpu`.
pub fn choose_backend(choice: BackendChoice, gpu_available: bool, crossover: u64, batch_bytes: u64) -> BackendKind {
    match choice {
        BackendChoice::Gpu if gpu_available => BackendKind::Gpu,
        BackendChoice::Auto if gpu_available && batch_bytes >= crossover => BackendKind::Gpu,
        _ => BackendKind::Cpu,
    }
}

/// Picks a backend per batch and counts the work. Shareable across threads (`&self` everywhere).
#[derive(Debug)]
pub struct Dispatcher {
    config: DispatcherConfig,
    cpu: CpuBackend,
    /// The GPU backend, or why there is none.
    gpu: Result<Arc<dyn Backend>, String>,
    metrics: Arc<CodecMetrics>,
}

impl Dispatcher {
    /// Builds the CPU backend and, unless the choice is [`BackendChoice::Cpu`], tries to open the GPU
    /// backend. Fails when the GPU is forced and cannot be opened, or when the CPU pool cannot start.
    pub fn new(config: DispatcherConfig) -> Result<Self, CodecError> {
        let cpu = match config.cpu_threads {
            CpuThreads::Single => CpuBackend::single_threaded(),
            CpuThreads::AllCores => CpuBackend::all_cores()?,
            CpuThreads::Fixed(n) => CpuBackend::with_threads(n)?,
        };
        let gpu = match config.choice {
            BackendChoice::Cpu => Err("not looked for: the backend choice is `cpu`".to_string()),
            BackendChoice::Auto | BackendChoice::Gpu => open_gpu(),
        };
        Self::with_backends(config, cpu, gpu)
    }

    /// A dispatcher over backends built by the caller (`gpu` is the GPU backend or why there is none).
    /// `config.cpu_threads` is not used: `cpu` is already built.
    pub fn with_backends(
        config: DispatcherConfig,
        cpu: CpuBackend,
        gpu: Result<Arc<dyn Backend>, String>,
    ) -> Result<Self, CodecError> {
        if let (BackendChoice::Gpu, Err(reason)) = (config.choice, &gpu) {
            return Err(CodecError::GpuUnavailable(reason.clone()));
        }
        Ok(Dispatcher {
            config,
            cpu,
            gpu,
            metrics: Arc::new(CodecMetrics::new()),
        })
    }

    /// Counts into `metrics` (shared with other dispatchers, say) instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<CodecMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn config(&self) -> &DispatcherConfig {
        &self.config
    }

    pub fn cpu(&self) -> &CpuBackend {
        &self.cpu
    }

    pub fn metrics(&self) -> &Arc<CodecMetrics> {
        &self.metrics
    }

    pub fn gpu_available(&self) -> bool {
        self.gpu.is_ok()
    }

    /// Why there is no GPU backend (`None` when there is one), for the node's startup log.
    pub fn gpu_unavailable_reason(&self) -> Option<&str> {
        self.gpu.as_ref().err().map(String::as_str)
    }

    /// The backend a batch of `batch_bytes` bytes goes to.
    pub fn choose(&self, batch_bytes: u64) -> BackendKind {
        self.pick(batch_bytes).kind()
    }

    fn pick(&self, batch_bytes: u64) -> &dyn Backend {
        let kind = choose_backend(
            self.config.choice,
            self.gpu.is_ok(),
            self.config.gpu_crossover_bytes,
            batch_bytes,
        );
        match (kind, &self.gpu) {
            (BackendKind::Gpu, Ok(gpu)) => gpu.as_ref(),
            _ => &self.cpu,
        }
    }

    /// CRC32 of every buffer, and the backend that computed them.
    pub fn checksum_batch(&self, bufs: &[&[u8]]) -> Result<(Vec<u32>, BackendKind), CodecError> {
        self.run(
            Op::Checksum,
            total_len(bufs),
            |b| b.checksum_batch(bufs),
            |crcs| 4 * crcs.len() as u64,
        )
    }

    /// Appends the encoded batch to `out` and says which backend encoded it. On error `out` is unchanged.
    pub fn encode_batch(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<BackendKind, CodecError> {
        let (_, kind) = self.run(
            Op::Encode,
            total_len(bufs),
            |b| b.encode_batch(bufs, out),
            |n| *n as u64,
        )?;
        Ok(kind)
    }

    /// Decodes one batch (on the CPU), appending the buffers to `out`; returns where each one lies.
    /// On error `out` is unchanged.
    pub fn decode_batch_into(&self, batch: &[u8], out: &mut Vec<u8>) -> Result<Vec<Range<usize>>, CodecError> {
        let start = out.len();
        let began = Instant::now();
        let result = self.cpu.decode_batch_into(batch, out);
        let produced = (out.len() - start) as u64;
        self.metrics.record(
            BackendKind::Cpu,
            Op::Decode,
            result.is_ok(),
            batch.len() as u64,
            produced,
            began.elapsed(),
        );
        result
    }

    /// Decodes one batch (on the CPU) into a fresh [`DecodedBatch`].
    pub fn decode_batch(&self, batch: &[u8]) -> Result<DecodedBatch, CodecError> {
        let mut data = Vec::new();
        let ranges = self.decode_batch_into(batch, &mut data)?;
        Ok(DecodedBatch::from_parts(data, ranges))
    }

    /// Runs `op` on the backend chosen for `bytes_in` bytes, counts it, and redoes it on the CPU when a GPU
    /// the dispatcher chose by itself fails.
    fn run<T>(
        &self,
        op: Op,
        bytes_in: u64,
        mut work: impl FnMut(&dyn Backend) -> Result<T, CodecError>,
        bytes_out: impl Fn(&T) -> u64,
    ) -> Result<(T, BackendKind), CodecError> {
        let mut attempt = |backend: &dyn Backend| {
            let began = Instant::now();
            let result = work(backend);
            let produced = result.as_ref().map_or(0, &bytes_out);
            self.metrics
                .record(backend.kind(), op, result.is_ok(), bytes_in, produced, began.elapsed());
            result.map(|value| (value, backend.kind()))
        };
        let backend = self.pick(bytes_in);
        match attempt(backend) {
            Err(e)
                if backend.kind() == BackendKind::Gpu
                    && self.config.choice == BackendChoice::Auto
                    && e.is_device_error() =>
            {
                self.metrics.record_gpu_fallback();
                attempt(&self.cpu)
            }
            result => result,
        }
    }
}

fn total_len(bufs: &[&[u8]]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Result<Arc<dyn Backend>, String> {
    match crate::cuda::CudaBackend::new() {
        Ok(backend) => Ok(Arc::new(backend)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Result<Arc<dyn Backend>, String> {
    Err("this build has no CUDA backend (cargo feature `cuda` of basalt-gpu is off)".to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::metrics::OpStats;

    /// A stand-in GPU: the CPU code under the GPU's name, or a device that always fails.
    #[derive(Debug)]
    struct FakeGpu {
        broken: AtomicBool,
    }

    impl FakeGpu {
        fn working() -> Arc<dyn Backend> {
            Arc::new(FakeGpu {
                broken: AtomicBool::new(false),
            })
        }
        fn broken() -> Arc<dyn Backend> {
            Arc::new(FakeGpu {
                broken: AtomicBool::new(true),
            })
        }
        fn check(&self) -> Result<(), CodecError> {
            if self.broken.load(Ordering::Relaxed) {
                return Err(CodecError::Gpu {
                    op: "launch",
                    detail: "simulated device failure".into(),
                });
            }
            Ok(())
        }
    }

    impl Backend for FakeGpu {
        fn kind(&self) -> BackendKind {
            BackendKind::Gpu
        }
        fn checksum_batch(&self, bufs: &[&[u8]]) -> Result<Vec<u32>, CodecError> {
            self.check()?;
            CpuBackend::single_threaded().checksum_batch(bufs)
        }
        fn encode_batch(&self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<usize, CodecError> {
            self.check()?;
            CpuBackend::single_threaded().encode_batch(bufs, out)
        }
        fn decode_batch_into(&self, batch: &[u8], out: &mut Vec<u8>) -> Result<Vec<Range<usize>>, CodecError> {
            CpuBackend::single_threaded().decode_batch_into(batch, out)
        }
    }

    fn config(choice: BackendChoice, crossover: u64) -> DispatcherConfig {
        DispatcherConfig {
            choice,
            gpu_crossover_bytes: crossover,
            cpu_threads: CpuThreads::Single,
        }
    }

    fn dispatcher(choice: BackendChoice, crossover: u64, gpu: Result<Arc<dyn Backend>, String>) -> Dispatcher {
        Dispatcher::with_backends(config(choice, crossover), CpuBackend::single_threaded(), gpu)
            .expect("a valid combination")
    }

    #[test]
    fn choice_matrix() {
        use BackendChoice::*;
        use BackendKind::{Cpu as C, Gpu as G};
        let cases = [
            // choice, gpu present, batch bytes (crossover 1000), expected
            (Auto, false, 0, C),
            (Auto, false, 1_000_000, C),
            (Auto, true, 999, C),
            (Auto, true, 1000, G),
            (Auto, true, 1_000_000, G),
            (Cpu, true, 1_000_000, C),
            (Cpu, false, 0, C),
            (Gpu, true, 0, G),
            (Gpu, true, 1_000_000, G),
            (Gpu, false, 1_000_000, C),
        ];
        for (choice, present, bytes, expected) in cases {
            assert_eq!(
                choose_backend(choice, present, 1000, bytes),
                expected,
                "{choice:?} gpu={present} {bytes}B"
            );
        }
    }

    #[test]
    fn forcing_a_missing_gpu_fails_at_construction() {
        let err = Dispatcher::with_backends(
            config(BackendChoice::Gpu, 0),
            CpuBackend::single_threaded(),
            Err("no device".into()),
        )
        .expect_err("forcing a missing GPU must fail");
        assert_eq!(err, CodecError::GpuUnavailable("no device".into()));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_auto_uses_the_cpu_and_gpu_is_refused() {
        let d = Dispatcher::new(config(BackendChoice::Auto, 0)).expect("auto never fails for want of a GPU");
        assert!(!d.gpu_available());
        assert!(d.gpu_unavailable_reason().is_some_and(|r| r.contains("cuda")));
        assert_eq!(d.choose(u64::MAX), BackendKind::Cpu);
        assert!(matches!(
            Dispatcher::new(config(BackendChoice::Gpu, 0)),
            Err(CodecError::GpuUnavailable(_))
        ));
    }

    #[test]
    fn auto_routes_by_size_and_counts_per_backend() {
        let d = dispatcher(BackendChoice::Auto, 1000, Ok(FakeGpu::working()));
        let small = vec![1u8; 999];
        let large = vec![2u8; 5000];
        let mut out = Vec::new();
        assert_eq!(d.encode_batch(&[&small], &mut out), Ok(BackendKind::Cpu));
        let small_len = out.len();
        assert_eq!(d.encode_batch(&[&large], &mut out), Ok(BackendKind::Gpu));
        let (crcs, kind) = d.checksum_batch(&[&large, &small]).expect("checksums");
        assert_eq!(kind, BackendKind::Gpu);
        assert_eq!(crcs, vec![crc32fast::hash(&large), crc32fast::hash(&small)]);

        let cpu = d.metrics().get(BackendKind::Cpu, Op::Encode);
        assert_eq!((cpu.calls, cpu.bytes_in, cpu.bytes_out), (1, 999, small_len as u64));
        let gpu = d.metrics().get(BackendKind::Gpu, Op::Encode);
        assert_eq!(
            (gpu.calls, gpu.bytes_in, gpu.bytes_out),
            (1, 5000, (out.len() - small_len) as u64)
        );
        assert_eq!(d.metrics().get(BackendKind::Gpu, Op::Checksum).bytes_out, 8);

        let decoded = d.decode_batch(&out[small_len..]).expect("decodes");
        assert_eq!(decoded.to_vecs(), vec![large]);
        assert_eq!(d.metrics().get(BackendKind::Cpu, Op::Decode).calls, 1);
        assert_eq!(d.metrics().get(BackendKind::Gpu, Op::Decode), OpStats::default());
    }

    #[test]
    fn a_failing_gpu_falls_back_under_auto_and_errors_when_forced() {
        let data = vec![3u8; 4096];
        let auto = dispatcher(BackendChoice::Auto, 0, Ok(FakeGpu::broken()));
        let mut out = Vec::new();
        assert_eq!(auto.encode_batch(&[&data], &mut out), Ok(BackendKind::Cpu));
        assert_eq!(auto.decode_batch(&out).expect("decodes").to_vecs(), vec![data.clone()]);
        assert_eq!(auto.metrics().gpu_fallbacks(), 1);
        assert_eq!(auto.metrics().get(BackendKind::Gpu, Op::Encode).errors, 1);

        let forced = dispatcher(BackendChoice::Gpu, 0, Ok(FakeGpu::broken()));
        let mut out = Vec::new();
        assert!(matches!(
            forced.encode_batch(&[&data], &mut out),
            Err(CodecError::Gpu { .. })
        ));
        assert!(out.is_empty());
        assert_eq!(forced.metrics().gpu_fallbacks(), 0);
    }

    #[test]
    fn data_errors_are_not_retried() {
        let d = dispatcher(BackendChoice::Auto, 0, Ok(FakeGpu::working()));
        let mut out = vec![0xAA];
        assert!(d.decode_batch_into(b"not a batch", &mut out).is_err());
        assert_eq!(out, vec![0xAA], "a failed decode leaves the output as it was");
        assert_eq!(d.metrics().get(BackendKind::Cpu, Op::Decode).errors, 1);
        assert_eq!(d.metrics().gpu_fallbacks(), 0);
    }
}
