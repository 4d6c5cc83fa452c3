"""What a run tells the world: canonical metric names and their sinks (metrics), TensorBoard and wandb (trackers),
completions at each checkpoint (samples), the run manifest with its lineage (manifest), and `compare`.

Its place in the import order: trainer_accel/layers.py.
"""
