"""cffi API-mode build script for fanotify (<sys/fanotify.h>).

Compiled as `erofs_nydus._native._fanotify`.  Only the two syscalls and the
constants the daemon needs are exposed; event parsing and response encoding are
pure Python (`erofs_nydus.fanotify.protocol`).  Older headers (Debian 12's
linux-libc-dev) predate the pre-content API of Linux 6.14, so the missing
constants are defined here with their upstream values.
"""

from cffi import FFI

ffi = FFI()
ffi.set_source(
    "erofs_nydus._native._fanotify",
    r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sys/fanotify.h>

#ifndef FAN_PRE_ACCESS
#define FAN_PRE_ACCESS 0x00100000
#endif
#ifndef FAN_CLASS_PRE_CONTENT
#define FAN_CLASS_PRE_CONTENT 0x00000008
#endif
#ifndef FAN_EVENT_INFO_TYPE_RANGE
#define FAN_EVENT_INFO_TYPE_RANGE 6
#endif
#ifndef FAN_ERRNO_BITS
#define FAN_ERRNO_BITS 8
#endif
#ifndef FAN_ERRNO_SHIFT
#define FAN_ERRNO_SHIFT (32 - FAN_ERRNO_BITS)
#endif
#ifndef FAN_ERRNO_MASK
#define FAN_ERRNO_MASK ((1 << FAN_ERRNO_BITS) - 1)
#endif
#ifndef FAN_MARK_IGNORE
#define FAN_MARK_IGNORE 0x00000400
#endif
#ifndef O_LARGEFILE
#define O_LARGEFILE 0
#endif
""",
)
ffi.cdef(
    """
int fanotify_init(unsigned int flags, unsigned int event_f_flags);
int fanotify_mark(int fanotify_fd, unsigned int flags, uint64_t mask,
                  int dirfd, const char *pathname);

#define FAN_CLOEXEC ...
#define FAN_NONBLOCK ...
#define FAN_CLASS_PRE_CONTENT ...
#define FAN_UNLIMITED_QUEUE ...
#define FAN_MARK_ADD ...
#define FAN_MARK_REMOVE ...
#define FAN_MARK_FLUSH ...
#define FAN_PRE_ACCESS ...
#define FAN_EVENT_INFO_TYPE_RANGE ...
#define FAN_ALLOW ...
#define FAN_DENY ...
#define FAN_NOFD ...
#define FAN_ERRNO_SHIFT ...
#define FAN_ERRNO_MASK ...
#define FANOTIFY_METADATA_VERSION ...
#define O_RDWR ...
#define O_LARGEFILE ...
#define AT_FDCWD ...
"""
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
