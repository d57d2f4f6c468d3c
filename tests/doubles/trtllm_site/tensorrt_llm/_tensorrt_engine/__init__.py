"""The TensorRT-engine `LLM` of the test double (the real one is `llmapi.llm._TrtLLM`)."""

from tensorrt_llm._double import LLM

__all__ = ["LLM"]
