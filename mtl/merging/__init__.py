"""Model merging: single-task fine-tuned models combined into one multi-task model.

One module per method (each a `Merger`: base weights and task vectors in, merged task vector
out), `task_vectors` for the shared arithmetic, `checkpoints` for what is merged (the shared
encoder; decoders copied, BatchNorm statistics recomputed or averaged), `realign` for the
decoder re-alignment and `run` for ``python -m mtl.merge``.
"""
