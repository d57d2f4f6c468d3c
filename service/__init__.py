"""The nemotron-serve service: tokenization, generation and (later) the gRPC surface."""
