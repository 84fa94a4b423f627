//! In-guest access. Guests are reached over SSH only; see [`ssh`].

pub mod ssh;
