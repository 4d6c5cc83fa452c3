"""The import order of the package, written once: each folder or top-level module on its floor, lowest first.

A module may import its own folder and any floor below its own, never a peer folder or a floor above; the ground
floor is one floor of small modules that import each other (acyclically). tests/test_architecture.py reads these
rules and checks every import in the package against them (function-level ones included); docs/architecture.md
says why each floor sits where it does. A new folder or top-level module gets its floor here first.
"""

FLOORS: list[tuple[str, set[str]]] = [
    ("ground", {"", "errors", "paths", "fsio", "faults", "versions", "overrides", "schema", "dependency_floors",
                "layers"}),
    ("data", {"data/"}),  # the tokenizer, the users' file formats, the token caches, prepare, the demo corpus
    ("models", {"models/"}),  # the decoder, the one model builder, each family's Hugging Face mapping
    ("devices", {"devices/"}),  # the Accelerator, hardware, collective decisions, stops, the run lock
    ("config", {"config"}),  # a phase config: its model_cfg may come from a model family's Hugging Face config.json
    ("checkpoints", {"checkpoints/"}),  # checkpoint directories written, found, checked and loaded; full state
    ("hf", {"hf/"}),  # Hugging Face directories read as a start point and written as an export
    ("observability", {"observability/"}),  # metric names and sinks, trackers, samples, manifests, compare
    ("training", {"training/"}),  # batches, losses, the input check, the start point, the loop and its helpers
    ("phases", {"phases/"}),  # each way of training declared in one module, the registry, pipelines
    ("experiments", {"experiments/"}),  # the run policy, --plan, the gate's evaluation, best.pt, runs, queue, doctor
    ("inference", {"inference/"}),  # a trained model from any form, with its tokenizer and template
    ("tools", {"tools/"}),  # measurements run by hand: bench, gpu_check, prepare_bench, heldout
    ("commands", {"run", "export", "prepare", "queue", "runs", "doctor", "compare", "bench", "gpu_check",
                  "prepare_bench", "generate", "chat"}),  # the python -m trainer_accel.X entry points
]  # fmt: skip
# data, models and devices stand side by side on the floor above the ground: none imports another.
PEERS = {"data", "models", "devices"}
# The floors whose modules may import each other (acyclically); on every other floor, a folder imports only itself.
SHARED = {"ground"}
