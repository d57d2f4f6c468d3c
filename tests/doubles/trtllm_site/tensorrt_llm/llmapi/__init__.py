"""`KvCacheConfig` of the test double (the real one is `llmapi.llm_args.KvCacheConfig`)."""

from tensorrt_llm._double import KvCacheConfig

__all__ = ["KvCacheConfig"]
