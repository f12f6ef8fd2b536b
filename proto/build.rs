//! Compiles `updateagent/v1/agent.proto` with protox (no system protoc needed) and
//! keeps the encoded descriptor set for gRPC server reflection.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "updateagent/v1/agent.proto";
    // An absolute path: checkouts at different paths share a target directory (CI
    // clones, the VM lab) with the same unit hash, and a relative path would let one
    // checkout's generated code pass for another's when its .proto is older.
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    println!("cargo:rerun-if-changed={}", dir.join(proto).display());
    let fds = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("updateagent_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
