"""Build hook: compile the cffi extension modules in erofs_nydus/_native/.

Each build script declares the kernel ABI it needs with `...` so the C compiler
takes sizes and constants from the real headers, with fallbacks for constants that
older headers (Debian 12's linux-libc-dev) lack.
"""

from setuptools import setup

setup(
    cffi_modules=[
        "erofs_nydus/_native/build_cachefiles.py:ffi",
        "erofs_nydus/_native/build_fanotify.py:ffi",
    ],
)
