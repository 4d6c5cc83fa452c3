"""Models: the decoder (gpt.py: GPT-2 and the Llama family as one configurable network that returns logits or
per-token log-probabilities), the one place a model is built (build.py), its configuration (config.py), and each
family's Hugging Face mapping beside it (`gpt_hf.py`, `llama_hf.py`: config.json and state-dict names both ways,
pure functions, no file access, each declaring families.FamilyMapping; `families.py` picks the mapping). Nothing
here reads files, touches devices or knows about training.

Its place in the import order: trainer_accel/layers.py.
"""
