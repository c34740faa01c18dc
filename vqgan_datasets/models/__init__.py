"""The tokenizer models: configs, Flax building blocks, checkpoints and conversion, `VQModel`."""
