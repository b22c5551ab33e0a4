"""The procedural shapes domain the bundled model is trained on: scenes and captions, text
pre-training on caption structure, the small autoencoder, and the GenEval-style evaluation."""
