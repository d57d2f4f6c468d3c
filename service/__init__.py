"""The nemotron-serve service: from a built engine to the APIs other programs call.

Layers, each importing only those below it (tests/test_imports.py checks it):

- `cli`: `nemotron-serve`, which serves (`server`) or chats in the terminal (`chat.terminal`).
- `server`: the gRPC process: flags and config, signals and drain, health, the servicer,
  protobuf conversion, the RPC wrapping, API keys and the one status table.
- `startup`: which profile and engine to serve on this hardware.
- `chat`: turns over any engine: model-family formats, reasoning, tools, the terminal chat.
- `observability`: tracing, structured logs, Prometheus metrics.
- `runtime`: the `Engine` interface and its backends (the PyTorch runtime, TensorRT-LLM),
  with the loader and tokenizer they need.
- `client`: `nemotron-chat` and `nemotron-healthcheck`, which import neither torch nor the
  runtime.
"""
