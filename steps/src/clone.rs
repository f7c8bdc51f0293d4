//! Reflink (FICLONE) and full copy; TODO(helper)
