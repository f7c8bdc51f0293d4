//! Group commit; TODO(helper)
