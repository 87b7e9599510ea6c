"""TFDS builders of refjax (RefShapes here; real-data builders in sibling modules).

Import a builder module to register it with tfds; ``refjax.data.build.build_dataset`` does this
lazily by dataset name.
"""
