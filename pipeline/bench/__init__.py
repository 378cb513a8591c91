"""Engine benchmarks: synthetic Llama-shape models, log-uniform prompts, HF baseline."""
