"""The OpenAI- and NIM-compatible HTTP API, beside gRPC in the same process and on the same engine.

`protocol` holds the request and response bodies as OpenAI defines them (plus NIM's `nvext`
and vLLM's extras), `convert` turns them into the engine's requests and its events back into
responses and stream chunks, `app` is the FastAPI application (routes, auth, errors, SSE), and
`http_server` runs it with uvicorn on the server's event loop.
"""
