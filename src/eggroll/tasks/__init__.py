"""Tasks: data and evaluation for recipes. text.py: byte-level corpora and n-gram bits/byte;
reasoning.py: reasoning problems with verifiable rewards; char_tokenizer.py: the small character
tokenizer of countdown-mini; diagnostics.py: per-generation LLM diagnostics."""
