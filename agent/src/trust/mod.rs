//! Trust: the signed root of trust, its rotation, and the envelope signed documents
//! share. `root.rs` is the document and its rules; `envelope.rs` the JSON wrapper;
//! `node.rs` what this node trusts and following the chain; `marks.rs` each channel's
//! newest accepted document and its payload pins.

pub mod envelope;
pub mod marks;
pub mod node;
pub mod root;

#[cfg(test)]
mod node_tests;
#[cfg(test)]
mod root_tests;
