"""Observability: OpenTelemetry tracing, structured logs and Prometheus metrics."""
