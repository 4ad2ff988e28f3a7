//! `basaltd`: runs one Basalt node until SIGTERM or SIGINT.
//!
//! Prints `basaltd ready node_id=N listen=ADDR metrics=ADDR` on stdout once it serves, so scripts
//! and test harnesses can wait for that line instead of polling ports.

use std::io::Write;
use std::process::ExitCode;

use basalt_server::config::{Flags, NodeConfig};
use basalt_server::node::Node;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cfg = match NodeConfig::resolve(Flags::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("basaltd: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log_level));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("basaltd: invalid log level {:?}: {e}", cfg.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("basaltd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cfg))
}

async fn run(cfg: NodeConfig) -> ExitCode {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("basaltd: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = match Node::start(cfg).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "failed to start");
            eprintln!("basaltd: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "basaltd ready node_id={} listen={} metrics={}",
        node.node_id(),
        node.listen_addr(),
        node.metrics_addr().map_or_else(|| "off".to_string(), |a| a.to_string())
    );
    let _ = std::io::stdout().flush();
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down");
    node.shutdown().await;
    ExitCode::SUCCESS
}
