"""A TEST DOUBLE of TensorRT-LLM's LLM API, not TensorRT-LLM: nothing here runs a model or a GPU.

Only tests put `tests/doubles/trtllm_site` on a server subprocess's PYTHONPATH (or on sys.path
for the duration of one test), so that `import tensorrt_llm` finds this package. It provides
exactly what `service/runtime/trtllm_runtime.py` uses: `SamplingParams`,
`_tensorrt_engine.LLM` (`generate_async`, `get_stats`, `shutdown`), `LLM` (the PyTorch flow's,
same methods) and `llmapi.KvCacheConfig`.
Every constructor and method checks its arguments against the contract fixture
(tests/data/trtllm_contract.json, read from TensorRT-LLM's source by tools/trtllm_contract.py)
with the same rules as tests/engine_build/test_trtllm_contract.py: a keyword the real API does
not take, or a missing required one, raises TypeError naming it. See `_double.py` for what the
"model" answers.
"""

from tensorrt_llm._double import SamplingParams
from tensorrt_llm._double import TorchLLM as LLM

__version__ = "1.2.1"  # the release the Dockerfile's gpu target names

__all__ = ["LLM", "SamplingParams", "__version__"]
