"""flaxcnn: CNN image classifiers and transfer learning in JAX/Flax."""
