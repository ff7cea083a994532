"""The GTZAN collection as a dataset loader knows it: layout and names, archive, artist lists."""
