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

# Open-ended chat prompts for the repetition measure of the sampling defaults (bench/repetition.py):
# answers long enough for a greedy model to loop.
OPEN_PROMPTS = (
    "Write a haiku about Kubernetes.",
    "Tell me a short story about a lighthouse keeper.",
    "Describe a walk through a forest in autumn.",
    "Write a poem about the sea.",
    "What would you do with a free day in Paris?",
    "Describe your ideal breakfast.",
    "Write a letter to a friend you have not seen in years.",
    "Tell me about a dragon who is afraid of fire.",
    "Describe the city of the future.",
    "Write a song about rain.",
    "What makes a good teacher?",
    "Describe a thunderstorm to someone who has never seen one.",
    "Write a short fable with a moral.",
    "Tell me about life on a space station.",
    "Describe the taste of chocolate.",
    "Write a motivational speech for a sports team.",
    "What is it like to learn a new language?",
    "Describe a busy market in the morning.",
    "Write a diary entry of a cat.",
    "Tell me a story that begins with a knock at the door.",
)
