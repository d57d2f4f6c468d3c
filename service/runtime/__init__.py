"""The generation runtime: the `Engine` interface and the backends behind it.

The PyTorch backend keeps vLLM v1's seams: `frontend` (async submit, stream, abort),
`core` (the engine core: scheduler, model steps, sampling, built whole after boot),
`output` (detokenization, stops, events) and `kv_manager` between `scheduler` and
`block_pool`. `factory` opens an engine from the repository by the backend its manifest names;
`sizing` sizes the KV cache from memory; `workers` runs tensor-parallel ranks.
"""
