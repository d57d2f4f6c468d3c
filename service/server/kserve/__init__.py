"""KServe v2 / Triton gRPC (`inference.GRPCInferenceService`) on the API port, beside nemotron.v1.

`tensors` decodes a request's input tensors and encodes outputs, `contract` maps the TensorRT-LLM
backend's tensors (`text_input`, `max_tokens`, ...) onto our generation requests, and
`servicer` serves the RPCs over the same engine, error table and observability as nemotron.v1.
"""
