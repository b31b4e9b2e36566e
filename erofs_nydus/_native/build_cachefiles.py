"""cffi API-mode build script for <linux/cachefiles.h> (placeholder, filled in by the fscache work)."""

from cffi import FFI

ffi = FFI()
ffi.set_source(
    "erofs_nydus._native._cachefiles",
    "#include <linux/cachefiles.h>\n",
)
ffi.cdef("#define CACHEFILES_IOC_READ_COMPLETE ...\n")

if __name__ == "__main__":
    ffi.compile(verbose=True)
