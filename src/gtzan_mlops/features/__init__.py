"""The feature sets: the 57 hand-crafted features, MSD_musicnn embeddings, their tables."""
