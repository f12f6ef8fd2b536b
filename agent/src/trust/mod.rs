//! Trust: the signed root of trust, its rotation, and the envelope signed documents
//! share. `root.rs` is the document and its rules; `envelope.rs` the JSON wrapper.

pub mod envelope;
pub mod marks;
pub mod node;
pub mod root;

#[cfg(test)]
mod root_tests;
