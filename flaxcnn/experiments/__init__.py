"""Command-line experiments: ``python -m flaxcnn.experiments.transfer`` / ``.simple_cnn``."""
