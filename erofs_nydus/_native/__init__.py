"""Compiled kernel ABI bindings (cffi API mode): `_cachefiles` and `_fanotify`.

Owns the C declarations (`build_*.py`, compiled by setup.py against the real kernel
headers) and nothing else: the modules expose syscalls and constants only; message
parsing lives in the pure codecs (`fscache.protocol`, `fanotify.protocol`).
Imports nothing from the package.
"""
