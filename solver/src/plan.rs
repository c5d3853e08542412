//! `plan`: work in progress.
