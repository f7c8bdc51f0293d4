//! The state-directory lock (std `File::try_lock`); TODO(helper)
/// Held for the life of a [`crate::Journal`]; released on drop.
pub struct StateLock {
    _file: std::fs::File,
}
