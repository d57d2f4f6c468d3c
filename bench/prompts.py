"""Prompt sets shared by the greedy-equality tests and the GPU check (one copy of each)."""

from __future__ import annotations

# Plain-text prompts whose greedy continuations must match across paths (HTTP and gRPC in
# tests/service/server/test_http_api.py; CUDA and the CPU in bench/gpu_check.py).
GREEDY_TEXT_PROMPTS = (
    "The capital of France is",
    "Water boils at",
    "The largest planet in the solar system is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
    "1, 2, 3, 4,",
    "Photosynthesis is the process",
    "The opposite of hot is",
    "Kubernetes is",
)

# Chat prompts of the transformers parity test (tests/parity), rendered with the chat template.
CHAT_PARITY_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into German and Spanish.",
    "Why is the sky blue? Answer in one sentence.",
)
