"""The generation runtime: one engine interface, the PyTorch scheduler and its backends."""
