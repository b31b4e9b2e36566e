"""cffi API-mode build script for ``<linux/cachefiles.h>`` (the fscache on-demand ABI).

Struct layouts are declared with ``...;`` so the C compiler takes sizes and offsets from the
real header; the pure-Python codec in :mod:`erofs_nydus.fscache.protocol` hard-codes the same
layout and a test checks that the two agree.  The module also exposes the ioctl used to
complete a READ and thin wrappers that report sizes/offsets without needing cffi at call sites.
"""

from __future__ import annotations

from cffi import FFI

ffi = FFI()

ffi.cdef(
    """
    #define CACHEFILES_MSG_MAX_SIZE ...
    #define CACHEFILES_IOC_READ_COMPLETE ...

    enum cachefiles_opcode {
        CACHEFILES_OP_OPEN,
        CACHEFILES_OP_CLOSE,
        CACHEFILES_OP_READ,
        ...
    };

    struct cachefiles_msg {
        uint32_t msg_id;
        uint32_t opcode;
        uint32_t len;
        uint32_t object_id;
        ...;
    };

    struct cachefiles_open {
        uint32_t volume_key_size;
        uint32_t cookie_key_size;
        uint32_t fd;
        uint32_t flags;
        ...;
    };

    struct cachefiles_read {
        uint64_t off;
        uint64_t len;
        ...;
    };

    /* offsetof(...data) for the two flexible array members */
    static const size_t ENS_MSG_DATA_OFFSET;
    static const size_t ENS_OPEN_DATA_OFFSET;
    """
)

ffi.set_source(
    "erofs_nydus._native._cachefiles",
    """
    #include <stddef.h>
    #include <linux/cachefiles.h>

    static const size_t ENS_MSG_DATA_OFFSET = offsetof(struct cachefiles_msg, data);
    static const size_t ENS_OPEN_DATA_OFFSET = offsetof(struct cachefiles_open, data);
    """,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
