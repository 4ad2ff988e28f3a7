//! `basalt-bench codec`: how fast the replication codec (`basalt-gpu`) checksums, compresses and
//! decompresses, on which backend, from which batch size, and how much it shrinks replication traffic.
//!
//! Why: leaders ship every write to every follower as AppendEntries messages, and snapshots as chunks;
//! the codec checksums and LZ4-compresses those buffers in batches, on the CPU (one core or all of them)
//! or, built with `--features cuda`, on a GPU. The dispatcher sends a batch to the GPU from a crossover
//! size on (`basalt_gpu::DEFAULT_GPU_CROSSOVER_BYTES`, a placeholder until measured); this command is
//! what measures it, and what shows whether compression is worth its CPU on realistic payloads at all.
//!
//! What it measures, for each batch size from 4 KiB up to `--max-size` (4 KiB, 64 KiB, 1 MiB, 16 MiB,
//! 256 MiB, 1 GiB) and each backend (`cpu1`: the CPU backend on the calling thread; `cpu`: the CPU
//! backend with a pool of one thread per core; `gpu`: the CUDA backend, host-device copies included,
//! because its calls include them):
//! - **checksum**: `checksum_batch`, the CRC32 of every buffer;
//! - **encode**: `encode_batch`, CRC32 plus LZ4 of every chunk into one framed batch;
//! - **decode**: `decode_batch_into`, verification of every CRC plus LZ4 decompression (the CUDA
//!   backend decodes on the CPU: there is no GPU LZ4 decoder).
//!
//! Throughput is *uncompressed* bytes over the median time of `--repeat` timed samples after one
//! warm-up sample (1 GB = 10^9 bytes). A sample of a small batch repeats the call until it has handled
//! at least [`TimingPlan::min_sample_bytes`], so that microsecond calls are not lost in timer noise.
//! The crossover is the smallest measured size from which on the GPU encodes faster than all CPU cores
//! at that size and every larger one.
//!
//! The payload ([`generate_batch`], in `payload.rs`) is a batch of `--buffer-size` buffers (64 KiB by
//! default), each the bytes of a real AppendEntries message as Basalt's transport encodes it (the
//! consensus layer's own types; each entry a `Put` of a `user/NNNNNN` key with a client session),
//! with values of 128 to 1024 bytes that are random bytes, JSON-like text records, repetitive text, or
//! a per-entry mix of the three (`--payload`). The compression ratio is reported for every kind.
//!
//! Invariants, and why:
//! - **A figure is only printed for output that was checked.** For every size and backend the checksums
//!   are compared with `crc32fast` and the decoded bytes and buffer boundaries with the input, once; a
//!   mismatch is an error ([`CodecBenchError`]), never a row.
//! - **Memory is freed between sizes**: one size's input, encoded and decoded buffers (about three
//!   times the batch size) are dropped before the next size is generated.
//! - Progress goes to stderr and the report to stdout, so `--json` output can be piped as is.

use std::ops::Range;
use std::time::Instant;

use basalt_gpu::{Backend, CodecError, CpuBackend};
use clap::{Args, ValueEnum};
use serde::Serialize;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The batch sizes measured: powers of 16 from 4 KiB to 1 GiB (capped by `--max-size`).
pub const SIZE_LADDER: [u64; 6] = [4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB, GIB];
/// The smallest `--max-size`.
pub const MIN_BATCH: u64 = 4 * KIB;
/// The largest `--max-size`: beyond this the three copies of a batch outgrow ordinary machines.
pub const MAX_BATCH: u64 = 16 * GIB;
/// Default `--max-size`, and with `--quick`.
pub const DEFAULT_MAX_SIZE: u64 = GIB;
pub const QUICK_MAX_SIZE: u64 = 16 * MIB;
/// Default `--repeat`, and with `--quick`.
pub const DEFAULT_REPEAT: usize = 5;
pub const QUICK_REPEAT: usize = 3;
/// Least bytes one timed sample handles (small batches are coded repeatedly within a sample).
pub const DEFAULT_MIN_SAMPLE_BYTES: usize = 32 << 20;
pub const QUICK_MIN_SAMPLE_BYTES: usize = 4 << 20;
/// Batch size at which the compression ratio of every payload kind is measured (or `--max-size` if
/// smaller).
pub const RATIO_SIZE: u64 = 16 * MIB;
/// Smallest and largest value of a generated entry, in bytes.
pub const VALUE_MIN: usize = 128;
pub const VALUE_MAX: usize = 1024;
/// Range of `--buffer-size`.
pub const MIN_BUFFER: u64 = KIB;
pub const MAX_BUFFER: u64 = 64 * MIB;

/// Which backends to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The CPU backend on one core.
    Cpu1,
    /// The CPU backend with one thread per core.
    Cpu,
    /// The CUDA backend (needs `--features cuda` and a device; an error without).
    Gpu,
    /// Both CPU configurations, and the GPU when there is one.
    All,
}

/// What the values of the generated log entries look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// Random bytes: incompressible, the worst case (encrypted or already compressed values).
    Random,
    /// JSON-like text records (user profiles): what a typical application stores.
    Text,
    /// One short line repeated: the best case (counters, status flags, padding).
    Repetitive,
    /// Each entry's value is one of the three others, chosen at random with equal odds.
    Mixed,
}

impl PayloadKind {
    /// Every kind, in the order the ratio table lists them.
    pub const ALL: [PayloadKind; 4] = [
        PayloadKind::Random,
        PayloadKind::Text,
        PayloadKind::Repetitive,
        PayloadKind::Mixed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PayloadKind::Random => "random",
            PayloadKind::Text => "text",
            PayloadKind::Repetitive => "repetitive",
            PayloadKind::Mixed => "mixed",
        }
    }

    /// What the values are, for the report.
    pub const fn describe(self) -> &'static str {
        match self {
            PayloadKind::Random => "random bytes",
            PayloadKind::Text => "JSON-like text records (user profiles with a free-text note)",
            PayloadKind::Repetitive => "one short ASCII line repeated",
            PayloadKind::Mixed => "random bytes, JSON-like text or repetitive text, one third each, per entry",
        }
    }
}

/// Parses a byte count: a whole number with an optional binary suffix `K`/`KiB`, `M`/`MiB`, `G`/`GiB`
/// (any case; `B` or nothing means bytes), e.g. `4096`, `64KiB`, `16M`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64KiB, 16MiB, 1GiB)"))?;
    let unit = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        other => return Err(format!("unknown size unit {other:?} (use K/KiB, M/MiB or G/GiB)")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too large"))
}

/// `65536` as `64 KiB`, `1073741824` as `1 GiB`, `1500` as `1.5 KiB`.
pub fn format_size(bytes: u64) -> String {
    let (unit, name) = match bytes {
        b if b >= GIB => (GIB, "GiB"),
        b if b >= MIB => (MIB, "MiB"),
        b if b >= KIB => (KIB, "KiB"),
        _ => return format!("{bytes} B"),
    };
    if bytes.is_multiple_of(unit) {
        format!("{} {name}", bytes / unit)
    } else {
        format!("{:.1} {name}", bytes as f64 / unit as f64)
    }
}

/// Measure the replication codec: checksum, compression and decompression GB/s per batch size and
/// backend, the GPU crossover, and compression ratios of replication payloads.
#[derive(Args, Debug, Clone)]
pub struct CodecArgs {
    /// A short run: sizes up to 16 MiB, 3 repetitions, smaller samples (seconds, not minutes).
    #[arg(long)]
    pub quick: bool,
    /// Largest batch size, e.g. 256MiB (K, M, G are powers of 1024) [default: 1GiB; 16MiB with --quick].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_size: Option<u64>,
    /// Timed samples per operation after one warm-up sample; the median is reported
    /// [default: 5; 3 with --quick].
    #[arg(long, value_name = "N")]
    pub repeat: Option<usize>,
    /// Backends to measure: cpu1 (one core), cpu (all cores), gpu, or all of those available.
    #[arg(long, value_enum, default_value_t = BackendArg::All)]
    pub backend: BackendArg,
    /// The values of the log entries in the throughput table (the ratio table shows every kind).
    #[arg(long, value_enum, default_value_t = PayloadKind::Mixed)]
    pub payload: PayloadKind,
    /// Bytes per buffer of a batch: one AppendEntries message each.
    #[arg(long, value_parser = parse_size, default_value = "64KiB", value_name = "SIZE")]
    pub buffer_size: u64,
    /// Seed of the payload generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Everything that can stop a codec measurement.
#[derive(thiserror::Error, Debug)]
pub enum CodecBenchError {
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    #[error("the GPU backend was asked for but cannot be used: {0}")]
    GpuUnavailable(String),
    #[error("could not start the CPU backend: {0}")]
    CpuPool(#[source] CodecError),
    #[error("{backend}: {op} of a {} batch failed: {source}", format_size(*.batch_bytes))]
    Codec {
        backend: String,
        op: &'static str,
        batch_bytes: u64,
        #[source]
        source: CodecError,
    },
    #[error("{backend}: wrong output for a {} batch: {detail}", format_size(*.batch_bytes))]
    WrongOutput {
        backend: String,
        batch_bytes: u64,
        detail: String,
    },
    #[error("generating the payload: {0}")]
    Payload(#[from] postcard::Error),
}

/// The resolved settings of one run (`--quick` defaults applied, validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub quick: bool,
    pub sizes: Vec<u64>,
    pub timing: TimingPlan,
    pub backend: BackendArg,
    pub payload: PayloadKind,
    pub buffer_bytes: usize,
    pub ratio_bytes: u64,
    pub seed: u64,
}

impl CodecArgs {
    /// Applies the `--quick` defaults and checks the values.
    pub fn settings(&self) -> Result<Settings, CodecBenchError> {
        let invalid = |reason: String| Err(CodecBenchError::InvalidArgs(reason));
        let max_size = self
            .max_size
            .unwrap_or(if self.quick { QUICK_MAX_SIZE } else { DEFAULT_MAX_SIZE });
        if !(MIN_BATCH..=MAX_BATCH).contains(&max_size) {
            return invalid(format!(
                "--max-size must be between {} and {}, not {}",
                format_size(MIN_BATCH),
                format_size(MAX_BATCH),
                format_size(max_size)
            ));
        }
        let repeat = self
            .repeat
            .unwrap_or(if self.quick { QUICK_REPEAT } else { DEFAULT_REPEAT });
        if repeat == 0 {
            return invalid("--repeat must be at least 1".into());
        }
        if !(MIN_BUFFER..=MAX_BUFFER).contains(&self.buffer_size) {
            return invalid(format!(
                "--buffer-size must be between {} and {}",
                format_size(MIN_BUFFER),
                format_size(MAX_BUFFER)
            ));
        }
        let mut sizes: Vec<u64> = SIZE_LADDER.iter().copied().filter(|&s| s <= max_size).collect();
        if sizes.last() != Some(&max_size) {
            sizes.push(max_size);
        }
        Ok(Settings {
            quick: self.quick,
            sizes,
            timing: TimingPlan {
                warmup: 1,
                repeat,
                min_sample_bytes: if self.quick {
                    QUICK_MIN_SAMPLE_BYTES
                } else {
                    DEFAULT_MIN_SAMPLE_BYTES
                },
            },
            backend: self.backend,
            payload: self.payload,
            // At most MAX_BUFFER, so it fits.
            buffer_bytes: self.buffer_size as usize,
            ratio_bytes: max_size.min(RATIO_SIZE),
            seed: self.seed,
        })
    }
}

mod payload;

pub use payload::{generate_batch, ReplicationBatch};

// ---------------------------------------------------------------------------------------------
// Timing and measurement.
// ---------------------------------------------------------------------------------------------

/// How each operation is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TimingPlan {
    /// Untimed samples first.
    pub warmup: usize,
    /// Timed samples; the median is reported.
    pub repeat: usize,
    /// A sample repeats the operation until it has handled at least this many bytes.
    pub min_sample_bytes: usize,
}

impl TimingPlan {
    /// Calls of the operation per sample for a batch of `bytes`.
    pub fn calls_per_sample(&self, bytes: usize) -> usize {
        (self.min_sample_bytes / bytes.max(1)).max(1)
    }
}

/// The median seconds per call of `op`.
fn time_op(plan: &TimingPlan, bytes: usize, mut op: impl FnMut() -> Result<(), CodecError>) -> Result<f64, CodecError> {
    let calls = plan.calls_per_sample(bytes);
    for _ in 0..plan.warmup * calls {
        op()?;
    }
    let mut samples = Vec::with_capacity(plan.repeat);
    for _ in 0..plan.repeat {
        let started = Instant::now();
        for _ in 0..calls {
            op()?;
        }
        samples.push(started.elapsed().as_secs_f64() / calls as f64);
    }
    Ok(median(&mut samples))
}

/// The median (the mean of the middle two for an even count); 0 for none.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let mid = samples.len() / 2;
    if !samples.len().is_multiple_of(2) {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2.0
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        f64::INFINITY
    }
}

/// The figures of one backend at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Measurement {
    /// `cpu1`, `cpu` or `gpu`.
    pub backend: String,
    /// CPU threads the backend uses (the GPU's decoding included); 0 for the GPU's own work.
    pub threads: usize,
    /// The nominal batch size.
    pub size_bytes: u64,
    /// Uncompressed bytes actually in the batch (what GB/s is computed from).
    pub input_bytes: u64,
    pub buffers: usize,
    pub entries: u64,
    /// Bytes of the encoded batch, headers included.
    pub encoded_bytes: u64,
    /// `input_bytes / encoded_bytes`.
    pub ratio: f64,
    /// Median seconds per call.
    pub checksum_secs: f64,
    pub encode_secs: f64,
    pub decode_secs: f64,
    /// Uncompressed bytes per second, in GB/s (10^9).
    pub checksum_gbps: f64,
    pub encode_gbps: f64,
    pub decode_gbps: f64,
    /// Calls per timed sample.
    pub calls_per_sample: usize,
    /// The checksums matched `crc32fast` and the decoded batch matched the input.
    pub verified: bool,
}

fn codec_error<'a>(
    backend: &'a str,
    op: &'static str,
    batch_bytes: u64,
) -> impl FnOnce(CodecError) -> CodecBenchError + 'a {
    move |source| CodecBenchError::Codec {
        backend: backend.to_string(),
        op,
        batch_bytes,
        source,
    }
}

/// Checks that `decoded` (with `ranges`) is exactly `batch`.
fn check_decoded(
    backend: &str,
    batch: &ReplicationBatch,
    decoded: &[u8],
    ranges: &[Range<usize>],
) -> Result<(), CodecBenchError> {
    let wrong = |detail: String| CodecBenchError::WrongOutput {
        backend: backend.to_string(),
        batch_bytes: batch.len() as u64,
        detail,
    };
    if ranges != batch.ranges.as_slice() {
        return Err(wrong(format!(
            "decoded {} buffers, {} were encoded, or their boundaries moved",
            ranges.len(),
            batch.ranges.len()
        )));
    }
    if decoded != batch.data.as_slice() {
        let at = decoded.iter().zip(&batch.data).position(|(a, b)| a != b);
        return Err(wrong(match at {
            Some(at) => format!("the decoded bytes differ from the input from byte {at} on"),
            None => format!("decoded {} bytes, {} were encoded", decoded.len(), batch.len()),
        }));
    }
    Ok(())
}

/// Times checksum, encode and decode of `batch` on `backend` and checks their output once.
pub fn measure(
    backend: &dyn Backend,
    name: &str,
    threads: usize,
    batch: &ReplicationBatch,
    plan: &TimingPlan,
) -> Result<Measurement, CodecBenchError> {
    let bufs = batch.bufs();
    let bytes = batch.len();
    let bytes_u64 = bytes as u64;

    let mut crcs = Vec::new();
    let checksum_secs = time_op(plan, bytes, || {
        crcs = std::hint::black_box(backend.checksum_batch(&bufs)?);
        Ok(())
    })
    .map_err(codec_error(name, "checksum", bytes_u64))?;
    if let Some(i) = bufs.iter().zip(&crcs).position(|(b, &c)| crc32fast::hash(b) != c) {
        return Err(CodecBenchError::WrongOutput {
            backend: name.to_string(),
            batch_bytes: bytes_u64,
            detail: format!("the checksum of buffer {i} differs from crc32fast's"),
        });
    }
    if crcs.len() != bufs.len() {
        return Err(CodecBenchError::WrongOutput {
            backend: name.to_string(),
            batch_bytes: bytes_u64,
            detail: format!("{} checksums for {} buffers", crcs.len(), bufs.len()),
        });
    }
    drop(crcs);

    let mut encoded = Vec::new();
    let encode_secs = time_op(plan, bytes, || {
        encoded.clear();
        backend.encode_batch(&bufs, &mut encoded).map(drop)
    })
    .map_err(codec_error(name, "encode", bytes_u64))?;

    let mut decoded = Vec::new();
    let mut ranges = Vec::new();
    let decode_secs = time_op(plan, bytes, || {
        decoded.clear();
        ranges = backend.decode_batch_into(&encoded, &mut decoded)?;
        Ok(())
    })
    .map_err(codec_error(name, "decode", bytes_u64))?;
    check_decoded(name, batch, &decoded, &ranges)?;

    let encoded_bytes = encoded.len() as u64;
    Ok(Measurement {
        backend: name.to_string(),
        threads,
        size_bytes: bytes_u64,
        input_bytes: bytes_u64,
        buffers: bufs.len(),
        entries: batch.entries,
        encoded_bytes,
        ratio: bytes_u64 as f64 / encoded_bytes.max(1) as f64,
        checksum_secs,
        encode_secs,
        decode_secs,
        checksum_gbps: gbps(bytes_u64, checksum_secs),
        encode_gbps: gbps(bytes_u64, encode_secs),
        decode_gbps: gbps(bytes_u64, decode_secs),
        calls_per_sample: plan.calls_per_sample(bytes),
        verified: true,
    })
}

// ---------------------------------------------------------------------------------------------
// Backends, crossover, ratios, report.
// ---------------------------------------------------------------------------------------------

/// A backend under test.
struct NamedBackend {
    name: &'static str,
    threads: usize,
    backend: Box<dyn Backend>,
}

/// Whether a GPU was measured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuStatus {
    pub measured: bool,
    /// The device, when one was opened.
    pub device: Option<String>,
    /// Why not, when none was.
    pub reason: Option<String>,
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Result<(Box<dyn Backend>, String), String> {
    let gpu = basalt_gpu::CudaBackend::new().map_err(|e| e.to_string())?;
    let device = gpu.device().to_string();
    Ok((Box::new(gpu), device))
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Result<(Box<dyn Backend>, String), String> {
    Err("built without the `cuda` feature (build basalt-bench with --features cuda)".into())
}

fn open_backends(choice: BackendArg) -> Result<(Vec<NamedBackend>, GpuStatus), CodecBenchError> {
    let mut backends = Vec::new();
    if matches!(choice, BackendArg::Cpu1 | BackendArg::All) {
        backends.push(NamedBackend {
            name: "cpu1",
            threads: 1,
            backend: Box::new(CpuBackend::single_threaded()),
        });
    }
    if matches!(choice, BackendArg::Cpu | BackendArg::All) {
        let cpu = CpuBackend::all_cores().map_err(CodecBenchError::CpuPool)?;
        backends.push(NamedBackend {
            name: "cpu",
            threads: cpu.threads(),
            backend: Box::new(cpu),
        });
    }
    let mut gpu = GpuStatus {
        measured: false,
        device: None,
        reason: Some("not asked for (--backend)".into()),
    };
    if matches!(choice, BackendArg::Gpu | BackendArg::All) {
        match open_gpu() {
            Ok((backend, device)) => {
                gpu = GpuStatus {
                    measured: true,
                    device: Some(device),
                    reason: None,
                };
                backends.push(NamedBackend {
                    name: "gpu",
                    threads: 0,
                    backend,
                });
            }
            Err(reason) if choice == BackendArg::Gpu => return Err(CodecBenchError::GpuUnavailable(reason)),
            Err(reason) => gpu.reason = Some(format!("no device: {reason}")),
        }
    }
    Ok((backends, gpu))
}

/// The batch size from which the GPU encodes faster than the CPU on all cores.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Crossover {
    /// The smallest measured size from which on the GPU was faster at that size and every larger one.
    Measured { size_bytes: u64 },
    /// The GPU was slower (or no faster) at the largest size measured.
    NotReached { max_size_bytes: u64 },
    /// No GPU was measured, or no all-core CPU to compare it with.
    NotMeasured { reason: String },
}

impl Crossover {
    /// From the rows of one run.
    pub fn from_rows(rows: &[Measurement], gpu: &GpuStatus) -> Self {
        if !gpu.measured {
            return Crossover::NotMeasured {
                reason: gpu.reason.clone().unwrap_or_else(|| "no device".into()),
            };
        }
        let of = |name: &str| -> Vec<(u64, f64)> {
            rows.iter()
                .filter(|r| r.backend == name)
                .map(|r| (r.size_bytes, r.encode_gbps))
                .collect()
        };
        let (cpu, gpu) = (of("cpu"), of("gpu"));
        if cpu.is_empty() {
            return Crossover::NotMeasured {
                reason: "the all-core CPU was not measured (--backend all compares them)".into(),
            };
        }
        let mut pairs: Vec<(u64, bool)> = gpu
            .iter()
            .filter_map(|&(size, g)| cpu.iter().find(|c| c.0 == size).map(|&(_, c)| (size, g > c)))
            .collect();
        pairs.sort_by_key(|p| p.0);
        let Some(&(max_size_bytes, _)) = pairs.last() else {
            return Crossover::NotMeasured {
                reason: "no size was measured on both".into(),
            };
        };
        let wins_from = pairs.iter().rposition(|p| !p.1).map_or(0, |i| i + 1);
        match pairs.get(wins_from) {
            Some(&(size_bytes, _)) => Crossover::Measured { size_bytes },
            None => Crossover::NotReached { max_size_bytes },
        }
    }

    fn describe(&self) -> String {
        match self {
            Crossover::Measured { size_bytes } => {
                format!("{} (GPU faster from this size on)", format_size(*size_bytes))
            }
            Crossover::NotReached { max_size_bytes } => {
                format!("not reached up to {}", format_size(*max_size_bytes))
            }
            Crossover::NotMeasured { reason } => reason.clone(),
        }
    }
}

/// The compression of one payload kind.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RatioRow {
    pub payload: PayloadKind,
    pub description: String,
    pub input_bytes: u64,
    pub entries: u64,
    /// The CPU backend's encoding (the same on one core and on all).
    pub cpu_encoded_bytes: u64,
    pub cpu_ratio: f64,
    pub gpu_encoded_bytes: Option<u64>,
    pub gpu_ratio: Option<f64>,
}

/// Encodes a batch of each payload kind on the CPU (and the GPU, if measured), checks that it decodes,
/// and reports the ratios.
fn ratios(settings: &Settings, cpu: &dyn Backend, gpu: Option<&dyn Backend>) -> Result<Vec<RatioRow>, CodecBenchError> {
    let mut rows = Vec::new();
    for kind in PayloadKind::ALL {
        let batch = generate_batch(
            kind,
            settings.ratio_bytes as usize,
            settings.buffer_bytes,
            settings.seed,
        )?;
        let bufs = batch.bufs();
        let input = batch.len() as u64;
        let encode_and_check = |name: &str, backend: &dyn Backend| -> Result<u64, CodecBenchError> {
            let mut wire = Vec::new();
            backend
                .encode_batch(&bufs, &mut wire)
                .map_err(codec_error(name, "encode", input))?;
            let mut decoded = Vec::new();
            let ranges = cpu
                .decode_batch_into(&wire, &mut decoded)
                .map_err(codec_error(name, "decode", input))?;
            check_decoded(name, &batch, &decoded, &ranges)?;
            Ok(wire.len() as u64)
        };
        let cpu_encoded_bytes = encode_and_check("cpu", cpu)?;
        let gpu_encoded_bytes = gpu.map(|g| encode_and_check("gpu", g)).transpose()?;
        rows.push(RatioRow {
            payload: kind,
            description: kind.describe().to_string(),
            input_bytes: input,
            entries: batch.entries,
            cpu_encoded_bytes,
            cpu_ratio: input as f64 / cpu_encoded_bytes.max(1) as f64,
            gpu_encoded_bytes,
            gpu_ratio: gpu_encoded_bytes.map(|e| input as f64 / e.max(1) as f64),
        });
    }
    Ok(rows)
}

/// The result of `basalt-bench codec`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CodecReport {
    pub payload: PayloadKind,
    pub payload_description: String,
    /// Bytes per buffer (one AppendEntries message).
    pub buffer_bytes: usize,
    pub value_bytes_min: usize,
    pub value_bytes_max: usize,
    pub seed: u64,
    pub quick: bool,
    pub timing: TimingPlan,
    pub cpu_cores: usize,
    pub gpu: GpuStatus,
    pub rows: Vec<Measurement>,
    pub crossover: Crossover,
    pub ratio_size_bytes: u64,
    pub ratios: Vec<RatioRow>,
    pub elapsed_secs: f64,
}

impl CodecReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("CodecReport holds only strings, numbers and enums, which serialise")
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "basalt-bench codec: payload {} ({}),\n  \
             in buffers of {} (one AppendEntries message each, encoded as Basalt's transport does: Put\n  \
             entries with keys user/NNNNNN, client sessions and values of {}-{} bytes)\n\
             GB/s = uncompressed bytes / median time of {} timed sample{} after {} warm-up (1 GB = 10^9 bytes);\n\
             every output checked once per size (checksums against crc32fast, decoded bytes against the input)\n\
             cpu1 = CPU backend, 1 thread; cpu = CPU backend, {} threads (batches under {} stay on one;\n  \
             checksums under {})\n",
            self.payload.name(),
            self.payload_description,
            format_size(self.buffer_bytes as u64),
            self.value_bytes_min,
            self.value_bytes_max,
            self.timing.repeat,
            if self.timing.repeat == 1 { "" } else { "s" },
            self.timing.warmup,
            self.cpu_cores,
            format_size(basalt_gpu::cpu::DEFAULT_PARALLEL_THRESHOLD as u64),
            format_size(basalt_gpu::cpu::DEFAULT_CHECKSUM_PARALLEL_THRESHOLD as u64),
        );
        match (&self.gpu.device, &self.gpu.reason) {
            (Some(device), _) => {
                out += &format!("gpu = {device}, host-device copies included; its decode runs on the CPU\n");
            }
            (None, Some(reason)) => out += &format!("gpu: not measured: {reason}\n"),
            (None, None) => out += "gpu: not measured\n",
        }
        out += "\n      size  backend  buffers  checksum GB/s  encode GB/s  decode GB/s  ratio\n";
        for r in &self.rows {
            out += &format!(
                "  {:>8}  {:<7}  {:>7}  {:>13.2}  {:>11.2}  {:>11.2}  {:>4.2}x\n",
                format_size(r.size_bytes),
                r.backend,
                r.buffers,
                r.checksum_gbps,
                r.encode_gbps,
                r.decode_gbps,
                r.ratio,
            );
        }
        out += &format!(
            "\nGPU crossover (encode, GPU vs CPU on all cores): {}\n",
            self.crossover.describe()
        );
        out += &format!(
            "\ncompression ratio at {} (uncompressed / encoded bytes, frame and batch headers included):\n",
            format_size(self.ratio_size_bytes)
        );
        out += "  payload     entries     cpu ratio  gpu ratio  values\n";
        for r in &self.ratios {
            let gpu = r.gpu_ratio.map_or_else(|| "n/a".to_string(), |g| format!("{g:.2}x"));
            out += &format!(
                "  {:<10}  {:>8}  {:>9.2}x  {:>9}  {}\n",
                r.payload.name(),
                r.entries,
                r.cpu_ratio,
                gpu,
                r.description
            );
        }
        out += &format!("\nmeasured in {:.1} s\n", self.elapsed_secs);
        out
    }
}

/// Warns on stderr when the largest size will not fit in the memory available.
fn warn_about_memory(max_size: u64) {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return;
    };
    let available_kib = meminfo.lines().find_map(|l| {
        l.strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
    });
    if let Some(kib) = available_kib {
        let needed = max_size.saturating_mul(3);
        if needed > kib.saturating_mul(1024) {
            eprintln!(
                "warning: a {} batch needs about {} (input, encoded, decoded); {} are available",
                format_size(max_size),
                format_size(needed),
                format_size(kib * 1024)
            );
        }
    }
}

/// Runs `basalt-bench codec` with `args`.
pub fn run(args: &CodecArgs) -> Result<CodecReport, CodecBenchError> {
    run_with(&args.settings()?)
}

/// Runs the measurement described by `settings`.
pub fn run_with(settings: &Settings) -> Result<CodecReport, CodecBenchError> {
    let started = Instant::now();
    let (backends, gpu) = open_backends(settings.backend)?;
    if let Some(reason) = &gpu.reason {
        eprintln!("gpu: {reason}");
    }
    if let Some(&max) = settings.sizes.last() {
        warn_about_memory(max);
    }
    let mut rows = Vec::new();
    for &size in &settings.sizes {
        eprintln!("{}: generating the payload...", format_size(size));
        // Dropped at the end of the iteration, before the next (larger) size is generated.
        let batch = generate_batch(settings.payload, size as usize, settings.buffer_bytes, settings.seed)?;
        for b in &backends {
            eprintln!("{}: {}...", format_size(size), b.name);
            let mut row = measure(&*b.backend, b.name, b.threads, &batch, &settings.timing)?;
            row.size_bytes = size;
            rows.push(row);
        }
    }
    let crossover = Crossover::from_rows(&rows, &gpu);
    eprintln!("compression ratios at {}...", format_size(settings.ratio_bytes));
    // The encoding does not depend on the thread count: all cores only make this faster.
    let fallback = CpuBackend::single_threaded();
    let cpu: &dyn Backend = backends
        .iter()
        .find(|b| b.name == "cpu")
        .map_or(&fallback, |b| &*b.backend);
    let gpu_backend = backends.iter().find(|b| b.name == "gpu").map(|b| &*b.backend);
    let ratios = ratios(settings, cpu, gpu_backend)?;
    Ok(CodecReport {
        payload: settings.payload,
        payload_description: settings.payload.describe().to_string(),
        buffer_bytes: settings.buffer_bytes,
        value_bytes_min: VALUE_MIN,
        value_bytes_max: VALUE_MAX,
        seed: settings.seed,
        quick: settings.quick,
        timing: settings.timing,
        cpu_cores: std::thread::available_parallelism().map_or(1, usize::from),
        gpu,
        rows,
        crossover,
        ratio_size_bytes: settings.ratio_bytes,
        ratios,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{BenchCommand, Cli};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<CodecArgs, clap::Error> {
        let cli = Cli::try_parse_from(["basalt-bench", "codec"].into_iter().chain(args.iter().copied()))?;
        match cli.command {
            Some(BenchCommand::Codec(args)) => Ok(args),
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    /// Settings small enough for a debug build: a few KiB, one sample of one call.
    fn tiny_plan() -> TimingPlan {
        TimingPlan {
            warmup: 1,
            repeat: 3,
            min_sample_bytes: 1,
        }
    }

    #[test]
    fn codec_is_a_subcommand_with_documented_defaults() {
        let args = parse(&[]).unwrap();
        assert!(!args.quick && !args.json);
        assert_eq!(args.backend, BackendArg::All);
        assert_eq!(args.payload, PayloadKind::Mixed);
        assert_eq!(args.buffer_size, 64 * KIB);
        let s = args.settings().unwrap();
        assert_eq!(s.sizes, SIZE_LADDER.to_vec(), "4 KiB to 1 GiB by default");
        assert_eq!(s.timing.repeat, DEFAULT_REPEAT);
        assert_eq!(s.timing.warmup, 1);
        assert_eq!(s.ratio_bytes, RATIO_SIZE);
        // The load run's required target does not apply to the subcommand, and its options do not mix.
        assert!(Cli::try_parse_from(["basalt-bench", "--local-cluster", "codec"]).is_err());
    }

    #[test]
    fn quick_shrinks_sizes_and_repetitions_unless_told_otherwise() {
        let s = parse(&["--quick"]).unwrap().settings().unwrap();
        assert_eq!(s.sizes, vec![4 * KIB, 64 * KIB, MIB, 16 * MIB]);
        assert_eq!(s.timing.repeat, QUICK_REPEAT);
        assert_eq!(s.timing.min_sample_bytes, QUICK_MIN_SAMPLE_BYTES);
        let s = parse(&["--quick", "--max-size", "256MiB", "--repeat", "7"])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(s.sizes.last(), Some(&(256 * MIB)));
        assert_eq!(s.timing.repeat, 7);
    }

    #[test]
    fn max_size_off_the_ladder_is_measured_too() {
        let s = parse(&["--max-size", "100M"]).unwrap().settings().unwrap();
        assert_eq!(s.sizes, vec![4 * KIB, 64 * KIB, MIB, 16 * MIB, 100 * MIB]);
        let s = parse(&["--max-size", "4096"]).unwrap().settings().unwrap();
        assert_eq!(s.sizes, vec![4 * KIB]);
        assert_eq!(s.ratio_bytes, 4 * KIB, "ratios at --max-size when it is below 16 MiB");
    }

    #[test]
    fn backends_and_payloads_parse_and_nonsense_is_refused() {
        for (arg, want) in [
            ("cpu1", BackendArg::Cpu1),
            ("cpu", BackendArg::Cpu),
            ("gpu", BackendArg::Gpu),
            ("all", BackendArg::All),
        ] {
            assert_eq!(parse(&["--backend", arg]).unwrap().backend, want);
        }
        for kind in PayloadKind::ALL {
            assert_eq!(parse(&["--payload", kind.name()]).unwrap().payload, kind);
        }
        assert!(parse(&["--backend", "tpu"]).is_err());
        assert!(parse(&["--payload", "zeros"]).is_err());
        assert!(parse(&["--max-size", "lots"]).is_err());
        assert!(parse(&["--repeat", "-1"]).is_err());
        for bad in [
            &["--repeat", "0"][..],
            &["--max-size", "1K"],
            &["--max-size", "17GiB"],
            &["--buffer-size", "512"],
        ] {
            assert!(
                matches!(parse(bad).unwrap().settings(), Err(CodecBenchError::InvalidArgs(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_parse_with_binary_units_and_print_back() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 * KIB));
        assert_eq!(parse_size("64k"), Ok(64 * KIB));
        assert_eq!(parse_size("16 MiB"), Ok(16 * MIB));
        assert_eq!(parse_size("1G"), Ok(GIB));
        assert_eq!(parse_size("2b"), Ok(2));
        for bad in ["", "MiB", "1.5M", "1MB", "-1", "99999999999999999999G", "20000000000G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_size(4 * KIB), "4 KiB");
        assert_eq!(format_size(GIB), "1 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(100), "100 B");
    }

    #[test]
    fn payload_kinds_compress_as_their_names_say() {
        let ratio = |kind| {
            let batch = generate_batch(kind, 256 * 1024, 64 * 1024, 3).unwrap();
            let mut wire = Vec::new();
            CpuBackend::single_threaded()
                .encode_batch(&batch.bufs(), &mut wire)
                .unwrap();
            batch.len() as f64 / wire.len() as f64
        };
        let (random, text, repetitive) = (
            ratio(PayloadKind::Random),
            ratio(PayloadKind::Text),
            ratio(PayloadKind::Repetitive),
        );
        assert!(
            random < 1.15,
            "random values barely compress (keys and headers do): {random}"
        );
        assert!(text > random && repetitive > text, "{random} < {text} < {repetitive}");
    }

    #[test]
    fn measure_reports_sane_verified_figures_on_a_tiny_batch() {
        let batch = generate_batch(PayloadKind::Mixed, 8 * 1024, 4 * 1024, 5).unwrap();
        let cpu = CpuBackend::single_threaded();
        let m = measure(&cpu, "cpu1", 1, &batch, &tiny_plan()).unwrap();
        assert_eq!(m.backend, "cpu1");
        assert_eq!(m.input_bytes, batch.len() as u64);
        assert_eq!(m.buffers, 2);
        assert_eq!(m.entries, batch.entries);
        assert!(m.verified);
        assert!(
            m.encoded_bytes > 0 && m.encoded_bytes < m.input_bytes,
            "mixed values compress"
        );
        assert!((m.ratio - m.input_bytes as f64 / m.encoded_bytes as f64).abs() < 1e-9);
        for (secs, gbps) in [
            (m.checksum_secs, m.checksum_gbps),
            (m.encode_secs, m.encode_gbps),
            (m.decode_secs, m.decode_gbps),
        ] {
            assert!(secs > 0.0 && secs < 1.0, "{secs}");
            assert!(gbps.is_finite() && gbps > 0.0);
            assert!((gbps - m.input_bytes as f64 / secs / 1e9).abs() < 1e-6 * gbps);
        }
        assert_eq!(m.calls_per_sample, 1);
        let plan = TimingPlan {
            min_sample_bytes: 64 * 1024,
            ..tiny_plan()
        };
        assert_eq!(plan.calls_per_sample(batch.len()), 64 * 1024 / batch.len());
    }

    #[test]
    fn wrong_decoded_output_is_an_error_not_a_figure() {
        let batch = generate_batch(PayloadKind::Text, 8 * 1024, 4 * 1024, 5).unwrap();
        let mut bad = batch.data.clone();
        bad[5000] ^= 1;
        assert!(matches!(
            check_decoded("cpu", &batch, &bad, &batch.ranges),
            Err(CodecBenchError::WrongOutput { .. })
        ));
        assert!(check_decoded("cpu", &batch, &batch.data, &batch.ranges[..1]).is_err());
        check_decoded("cpu", &batch, &batch.data, &batch.ranges).unwrap();
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    fn row(backend: &str, size: u64, encode_gbps: f64) -> Measurement {
        Measurement {
            backend: backend.into(),
            threads: 1,
            size_bytes: size,
            input_bytes: size,
            buffers: 1,
            entries: 1,
            encoded_bytes: size,
            ratio: 1.0,
            checksum_secs: 1.0,
            encode_secs: 1.0,
            decode_secs: 1.0,
            checksum_gbps: 1.0,
            encode_gbps,
            decode_gbps: 1.0,
            calls_per_sample: 1,
            verified: true,
        }
    }

    #[test]
    fn crossover_is_where_the_gpu_stays_ahead() {
        let gpu = GpuStatus {
            measured: true,
            device: Some("test".into()),
            reason: None,
        };
        let rows = [
            row("cpu", 4096, 1.0),
            row("gpu", 4096, 2.0), // a fluke at a small size
            row("cpu", MIB, 1.0),
            row("gpu", MIB, 0.5),
            row("cpu", 16 * MIB, 1.0),
            row("gpu", 16 * MIB, 3.0),
            row("cpu", GIB, 1.0),
            row("gpu", GIB, 9.0),
        ];
        assert_eq!(
            Crossover::from_rows(&rows, &gpu),
            Crossover::Measured { size_bytes: 16 * MIB }
        );
        assert_eq!(
            Crossover::from_rows(&rows[..4], &gpu),
            Crossover::NotReached { max_size_bytes: MIB }
        );
        let none = GpuStatus {
            measured: false,
            device: None,
            reason: Some("no device: none here".into()),
        };
        assert_eq!(
            Crossover::from_rows(&rows, &none),
            Crossover::NotMeasured {
                reason: "no device: none here".into()
            }
        );
        assert!(matches!(
            Crossover::from_rows(&[row("gpu", MIB, 1.0)], &gpu),
            Crossover::NotMeasured { .. }
        ));
    }

    #[test]
    fn a_whole_run_on_small_sizes_reports_every_backend_and_kind() {
        let mut settings = parse(&["--max-size", "64KiB", "--repeat", "1", "--buffer-size", "16KiB"])
            .unwrap()
            .settings()
            .unwrap();
        settings.timing.min_sample_bytes = 1;
        let report = run_with(&settings).unwrap();
        let cpu_rows: Vec<&str> = report
            .rows
            .iter()
            .filter(|r| r.backend != "gpu")
            .map(|r| r.backend.as_str())
            .collect();
        assert_eq!(cpu_rows, ["cpu1", "cpu", "cpu1", "cpu"]);
        assert!(report.rows.iter().all(|r| r.verified && r.encode_gbps > 0.0));
        assert_eq!(report.rows[2].size_bytes, 64 * KIB);
        assert_eq!(report.rows[2].buffers, 4);
        assert_eq!(report.ratios.len(), PayloadKind::ALL.len());
        assert!(report
            .ratios
            .iter()
            .all(|r| r.input_bytes == 64 * KIB || r.input_bytes + 4 >= 64 * KIB));
        if !report.gpu.measured {
            assert!(matches!(report.crossover, Crossover::NotMeasured { .. }));
            assert!(report.ratios.iter().all(|r| r.gpu_ratio.is_none()));
        }
        let text = report.render_text();
        assert!(
            text.contains("payload mixed") && text.contains("GPU crossover"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["rows"].as_array().map(Vec::len), Some(report.rows.len()));
        assert_eq!(json["payload"], "mixed");
    }
}
