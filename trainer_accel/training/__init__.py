"""Training: batches by address (batches), what a loss gives the loop (losses), the check of every input a phase
reads (inputs), where a phase's weights come from (start), and the one Accelerator-wrapped loop (loop) with its
collaborators: saving and progress.

Its place in the import order: trainer_accel/layers.py.
"""
