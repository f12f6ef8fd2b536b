//! Compiles `updateagent/v1/agent.proto` with protox (no system protoc needed) and
//! keeps the encoded descriptor set for gRPC server reflection.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "updateagent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("updateagent_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
