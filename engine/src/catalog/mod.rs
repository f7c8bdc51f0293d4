//! The catalog model, stored in the journal's catalog trees: volumes and
//! their snapshots (`vol.rs`, re-exported here as they always were), and
//! domains and their snapshots ([`dom`]).
//!
//! **The catalog depends on no other module of the engine's API**: `volume`,
//! `domain` and `domsnap` use it, never the other way (`catalog` ←
//! `domain` ← `domsnap`).

pub mod dom;
mod vol;

pub use vol::*;
