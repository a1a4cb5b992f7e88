"""plt-bench: decode latency, memory and quality against the paper and against llama.cpp."""
