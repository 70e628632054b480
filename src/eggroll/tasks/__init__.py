"""Tasks: data, environments and rewards that turn a model and its population noise into fitness.

    text            byte-level corpora (stdlib default, local files, HF datasets), n-gram bits/byte
    rl              JAX RL environments behind one interface (`make_env`), jitted rollouts
    reasoning       reasoning problems with verifiable rewards (countdown, gsm8k, custom)
    char_tokenizer  the small character tokenizer of countdown-mini
    diagnostics     per-generation LLM diagnostics (no-signal fraction, truncation, ...)
    finetune        the shared EGGROLL / GRPO fine-tuning harness for transformers
"""
