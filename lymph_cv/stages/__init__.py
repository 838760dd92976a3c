"""The pipeline's stages: each module computes one step and exports its Stage."""
