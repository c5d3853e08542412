//! End-to-end tests of the store commands, through the real `kiln` binary,
//! against real skopeo and umoci.
//!
//! Tests that need root, mounts or an external tool print a skip message
//! and return when it is missing, except under `CI=true`, where they fail.

#![expect(
    clippy::print_stderr,
    reason = "tests report skips, seeds and counts on stderr"
)]

mod store;
mod support;
