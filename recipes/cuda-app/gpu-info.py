"""Print the CUDA devices through the driver API (libcuda from the host). Without a driver (a CI runner,
a login node) it says so and exits 0; with a driver that fails to initialise it exits 3."""
import ctypes
import sys

try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print(f"no CUDA driver: {e}")
    sys.exit(0)
n = ctypes.c_int()
if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
    print("cuInit failed")
    sys.exit(3)
print(f"{n.value} CUDA device(s)")
