//! The CUDA backend on a real device (cargo feature `cuda`). Without a device every test prints
//! "skipped: no CUDA device (reason)" and passes; what must hold everywhere is that asking for the
//! device never panics.

#![cfg(feature = "cuda")]

mod common;

use std::sync::OnceLock;

use basalt_gpu::{
    Backend, BackendChoice, BackendKind, CodecError, CpuBackend, CpuThreads, CudaBackend, Dispatcher, DispatcherConfig,
    Op,
};
use common::{batch, mixed_buffers, noise, refs};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// The device, opened once for the whole test binary; `None` (after saying why) without one.
fn device() -> Option<&'static CudaBackend> {
    static DEVICE: OnceLock<Result<CudaBackend, CodecError>> = OnceLock::new();
    match DEVICE.get_or_init(CudaBackend::new) {
        Ok(backend) => Some(backend),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn opening_the_device_never_panics() {
    let result = std::panic::catch_unwind(CudaBackend::new);
    match result {
        Ok(Ok(backend)) => println!("found {}", backend.device()),
        Ok(Err(e)) => {
            assert!(matches!(e, CodecError::GpuUnavailable(_)), "{e:?}");
            println!("no device, as an error: {e}");
        }
        Err(_) => panic!("CudaBackend::new panicked instead of returning an error"),
    }
}

#[test]
fn dispatcher_without_a_device_refuses_a_forced_gpu_and_uses_the_cpu_under_auto() {
    let config = |choice| DispatcherConfig {
        choice,
        cpu_threads: CpuThreads::Single,
        ..DispatcherConfig::default()
    };
    let auto = Dispatcher::new(config(BackendChoice::Auto)).expect("auto never fails for want of a GPU");
    let forced = Dispatcher::new(config(BackendChoice::Gpu));
    if device().is_some() {
        assert!(auto.gpu_available());
        assert_eq!(forced.expect("a GPU is present").choose(0), BackendKind::Gpu);
    } else {
        assert!(!auto.gpu_available());
        assert_eq!(auto.choose(u64::MAX), BackendKind::Cpu);
        assert!(matches!(forced, Err(CodecError::GpuUnavailable(_))));
    }
}

#[test]
fn gpu_checksums_equal_crc32fast() {
    let Some(gpu) = device() else { return };
    let sizes = [0usize, 1, 3, 255, 256, 257, 65_536, 1_000_003, 5 << 20];
    let bufs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| noise(n, i as u64 + 1)).collect();
    let expected: Vec<u32> = bufs.iter().map(|b| crc32fast::hash(b)).collect();
    assert_eq!(gpu.checksum_batch(&refs(&bufs)).expect("device checksum"), expected);
    // Many small buffers (gathered on the host before the copy) and none at all.
    let small: Vec<Vec<u8>> = (0..1000).map(|i| noise(i % 97, i as u64)).collect();
    let expected: Vec<u32> = small.iter().map(|b| crc32fast::hash(b)).collect();
    assert_eq!(gpu.checksum_batch(&refs(&small)).expect("device checksum"), expected);
    assert_eq!(gpu.checksum_batch(&[]).expect("empty batch"), Vec::<u32>::new());
    assert_eq!(gpu.checksum_batch(&[b"", b""]).expect("empty buffers"), vec![0, 0]);
}

#[test]
fn gpu_encoding_compresses_and_decodes_on_the_cpu() {
    let Some(gpu) = device() else { return };
    let mut big = vec![0u8; 3 << 20];
    big.extend(noise(1 << 20, 5));
    let bufs = vec![big, mixed_buffers().concat(), Vec::new()];
    let mut wire = Vec::new();
    gpu.encode_batch(&refs(&bufs), &mut wire).expect("device encode");
    assert!(
        wire.len() < (1 << 20) + 200_000,
        "3 MiB of zeros must compress on the GPU: {} bytes",
        wire.len()
    );
    let cpu = CpuBackend::single_threaded();
    assert_eq!(
        cpu.decode_batch(&wire).expect("the CPU decodes GPU frames").to_vecs(),
        bufs
    );
    for bit in (0..wire.len() * 8).step_by(997) {
        let mut corrupt = wire.clone();
        corrupt[bit / 8] ^= 1 << (bit % 8);
        assert!(cpu.decode_batch(&corrupt).is_err(), "bit {bit} flipped unnoticed");
    }
}

#[test]
fn forced_gpu_dispatcher_reports_the_gpu_in_its_counters() {
    if device().is_none() {
        return;
    }
    let config = DispatcherConfig {
        choice: BackendChoice::Gpu,
        ..DispatcherConfig::default()
    };
    let dispatcher = Dispatcher::new(config).expect("a GPU is present");
    let data = vec![42u8; 100_000];
    let mut wire = Vec::new();
    assert_eq!(dispatcher.encode_batch(&[&data], &mut wire), Ok(BackendKind::Gpu));
    assert_eq!(dispatcher.decode_batch(&wire).expect("decodes").to_vecs(), vec![data]);
    let stats = dispatcher.metrics().get(BackendKind::Gpu, Op::Encode);
    assert_eq!(
        (stats.calls, stats.bytes_in, stats.bytes_out),
        (1, 100_000, wire.len() as u64)
    );
}

#[test]
fn gpu_round_trip_and_checksums() {
    let Some(gpu) = device() else { return };
    let mut runner = TestRunner::new(ProptestConfig::with_cases(32));
    runner
        .run(&batch(), |bufs| {
            let fail = |e: CodecError| TestCaseError::fail(e.to_string());
            let mut wire = Vec::new();
            gpu.encode_batch(&refs(&bufs), &mut wire).map_err(fail)?;
            let decoded = CpuBackend::single_threaded().decode_batch(&wire).map_err(fail)?;
            prop_assert_eq!(decoded.to_vecs(), bufs.clone());
            let expected: Vec<u32> = bufs.iter().map(|b| crc32fast::hash(b)).collect();
            prop_assert_eq!(gpu.checksum_batch(&refs(&bufs)).map_err(fail)?, expected);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Set in the child process of `a_driver_library_without_cuda_makes_new_fail_without_a_panic`.
#[cfg(target_os = "linux")]
const FAKE_DRIVER_ENV: &str = "BASALT_GPU_FAKE_DRIVER";

/// A `libcuda.so` and `libnvrtc.so` that load but define nothing: cudarc finds the libraries, then
/// panics on its first call for want of a symbol. `CudaBackend::new` must turn that into an error. The
/// dynamic loader reads `LD_LIBRARY_PATH` at process start, so the check runs in a child process (this
/// test binary again, running only `fake_driver_child`).
#[cfg(target_os = "linux")]
#[test]
fn a_driver_library_without_cuda_makes_new_fail_without_a_panic() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-cuda-driver");
    std::fs::create_dir_all(&dir).expect("the test's temporary directory can be created");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    for lib in ["libcuda.so", "libnvrtc.so"] {
        let built = std::process::Command::new(&cc)
            .args(["-shared", "-fPIC", "-x", "c", "/dev/null", "-o"])
            .arg(dir.join(lib))
            .status();
        if !built.is_ok_and(|s| s.success()) {
            println!("skipped: no C compiler ({cc}) to build a fake driver library");
            return;
        }
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let child = std::process::Command::new(exe)
        .args(["--exact", "fake_driver_child", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", &dir)
        .env(FAKE_DRIVER_ENV, "1")
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && stdout.contains("fake driver: GPU backend unavailable: the CUDA bindings panicked"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
}

#[cfg(target_os = "linux")]
#[test]
fn fake_driver_child() {
    if std::env::var_os(FAKE_DRIVER_ENV).is_none() {
        return; // only meaningful in the child process started above
    }
    let err = CudaBackend::new().expect_err("a driver library without CUDA symbols cannot open a device");
    println!("fake driver: {err}");
    assert!(matches!(err, CodecError::GpuUnavailable(_)), "{err:?}");
}
