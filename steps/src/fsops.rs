//! File operations with fsync discipline; TODO(helper)
