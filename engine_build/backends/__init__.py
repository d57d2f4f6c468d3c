"""Engine build backends behind one interface (`base`), chosen by name (`registry`).

`torch_engine` builds our own PyTorch engine format (runs everywhere); `trtllm` drives
TensorRT-LLM where it is installed.
"""
