"""Models: each family's module (the network; it returns logits) with its Hugging Face mapping beside it
(`<family>_hf.py`: config.json and state-dict names both ways, pure functions, no file access).

May import: the ground floor (config, errors). Nothing here reads files, touches devices or knows about training.
"""
