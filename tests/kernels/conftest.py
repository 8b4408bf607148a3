import os

# Must happen before triton is imported anywhere: the kernels run on Triton's CPU interpreter here.
os.environ.setdefault("TRITON_INTERPRET", "1")
