"""The server process: flags, signals and drain, health, servicer, conversion, RPC wrapping, auth.

`process` runs it; `servicer` is the thin gRPC layer over the engine, `convert` the protobuf <->
domain mapping, `rpc` what wraps every call (ids, logs, span, metrics), `status` the one table
from domain errors to status codes, `auth` the API keys.
"""
