"""Tasks: reasoning problems with verifiable rewards (reasoning.py), the small character
tokenizer of countdown-mini (char_tokenizer.py) and per-generation LLM diagnostics
(diagnostics.py)."""
