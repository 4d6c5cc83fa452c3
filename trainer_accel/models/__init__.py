"""Models: the decoder (gpt.py: GPT-2 and the Llama family as one configurable network that returns logits), its
configuration (config.py), and each family's Hugging Face mapping beside it (`gpt_hf.py`, `llama_hf.py`: config.json
and state-dict names both ways, pure functions, no file access; `families.py` picks the mapping).

May import: the ground floor (errors, schema). Nothing here reads files, touches devices or knows about training.
"""
