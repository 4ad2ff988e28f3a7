//! Compiles `proto/basalt/v1/*.proto` with protox (pure Rust, no `protoc` needed) and generates the
//! tonic client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/basalt/v1/kv.proto",
        "proto/basalt/v1/admin.proto",
        "proto/basalt/v1/errors.proto",
        "proto/basalt/v1/peer.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().bytes(".basalt.v1").compile_fds(fds)?;
    Ok(())
}
