"""Inference forms of our embedding collections (`inference_model`), and their row stores."""
