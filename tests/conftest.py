import importlib.util
import os

import torch

# The trainer's tests need its dependencies (hydra, datasets, ...); an image with only
# torch/triton/einops (a lent GPU machine) runs the kernel, layer and model tests alone.
TRAINER_TESTS = [
    "cli",
    "e2e",
    "train",
    "sweep",
    "export",
    "data/test_chat.py",
    "hf/test_init_from.py",
]
collect_ignore = [] if importlib.util.find_spec("hydra") else TRAINER_TESTS

if torch.cuda.is_available():
    # On a GPU machine the same tests exercise the CUDA paths (native Triton, grouped_mm).
    torch.set_default_device("cuda")
else:
    # Triton kernels run on the CPU only through its interpreter, which must be chosen
    # before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
