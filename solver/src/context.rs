//! `context`: work in progress.
