//! The gRPC API of update-agent, generated from `updateagent/v1/agent.proto`.

/// Package `updateagent.v1`. No breaking changes inside v1 (see docs/api.md).
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("updateagent.v1");

    /// The encoded `FileDescriptorSet` of the package, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/updateagent_v1_descriptor.bin"));
}
