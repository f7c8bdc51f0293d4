//! qemu-img / qemu-io adapter; TODO(helper)
