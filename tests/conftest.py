import os
import sys

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be
# chosen before triton is imported anywhere.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and os.path.exists("/dev/nvidia0"):
    pass
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
