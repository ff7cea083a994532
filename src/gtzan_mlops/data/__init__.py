"""The audio and the GTZAN collection: decoding, the dataset, the synthetic demo, splits."""
