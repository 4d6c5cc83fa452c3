"""Using a trained model: load it from any form it comes in, with its tokenizer and chat template, and generate
(the KV-cached loop itself is models/generation.py).

Its place in the import order: trainer_accel/layers.py.
"""
