//! `event`: work in progress.
