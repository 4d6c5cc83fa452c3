"""Using a trained model: load it from any form it comes in, with its tokenizer and chat template, and generate
(the KV-cached loop itself is models/generation.py).

May import: every folder below experiments/ (training/start for the start-point loader, hf/ for tokenizers
and exports, devices/ for the device rule).
"""
