//! kiln's runtime: containers, volumes and networks, built on the store
//! (`kiln-cache`) and the sandbox (`kiln-executor`).

#![deny(missing_docs)]

pub mod network;
