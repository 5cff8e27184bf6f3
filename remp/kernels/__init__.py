"""Native CPU kernels, compiled on first use on the machine that runs them and loaded with ctypes.

They are plain C++ with OpenMP and no torch headers, so a build takes about a second; `-march=native` makes each
machine's build use the vector units it has (AVX2 on one, AVX512 on another), which a wheel built elsewhere could
not. Builds are cached under the remp cache (`REMP_CACHE_DIR`), keyed by the source, the compiler and the CPU.
Where no compiler works, or `REMP_NATIVE_KERNELS=0`, remp runs the same computation in torch ops.
"""
