"""The gRPC surface: protobuf conversions, the servicer, and the error table."""
