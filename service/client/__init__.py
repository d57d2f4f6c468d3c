"""Client programs (nemotron-chat, nemotron-healthcheck): grpc and the API stubs, never torch."""
