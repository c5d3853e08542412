//! `key`: work in progress.
