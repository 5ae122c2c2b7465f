"""Print the CUDA devices through the driver API (libcuda from the host), or say why there are none."""
import ctypes
import sys

try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print(f"no CUDA driver: {e}")
    sys.exit(2)
n = ctypes.c_int()
if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
    print("cuInit failed")
    sys.exit(3)
print(f"{n.value} CUDA device(s)")
