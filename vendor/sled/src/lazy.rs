//! This module exists because `lazy_static` causes TSAN to
//! be very unhappy. We rely heavily on TSAN for finding
//! races, so we don't use `lazy_static`.
//!
//! vsnap's patch (see VSNAP-PATCH.md at the crate's root): the original
//! guarded the initializer with a spin lock that never yielded. sled's
//! threadpool is such a `Lazy`, and its initializer spawns 7 threads that
//! at once deref the same `Lazy`: they spun against the thread still
//! spawning them, starving it on a 2-core machine. `std::sync::OnceLock`
//! gives the same semantics (one initializer, every caller sees its value)
//! and parks the waiting threads instead.

use std::sync::OnceLock;

/// A lazily initialized value.
pub struct Lazy<T, F> {
    cell: OnceLock<T>,
    init: F,
}

impl<T, F> Lazy<T, F> {
    /// Create a new Lazy.
    pub const fn new(init: F) -> Self
    where
        F: Sized,
    {
        Self { cell: OnceLock::new(), init }
    }
}

impl<T, F> std::ops::Deref for Lazy<T, F>
where
    F: Fn() -> T,
{
    type Target = T;

    fn deref(&self) -> &T {
        self.cell.get_or_init(|| (self.init)())
    }
}
