"""Chat over any engine: turns, model-family formats (reasoning, tools), the terminal chat."""
