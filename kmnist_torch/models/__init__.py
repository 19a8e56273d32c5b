"""The models (one file per family), their registry, the 4-NN baseline and the model file."""
