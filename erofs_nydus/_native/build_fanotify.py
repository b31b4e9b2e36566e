"""cffi API-mode build script for fanotify (placeholder, filled in by the daemon work)."""

from cffi import FFI

ffi = FFI()
ffi.set_source(
    "erofs_nydus._native._fanotify",
    "#include <sys/fanotify.h>\n",
)
ffi.cdef("int fanotify_init(unsigned int flags, unsigned int event_f_flags);\n")

if __name__ == "__main__":
    ffi.compile(verbose=True)
