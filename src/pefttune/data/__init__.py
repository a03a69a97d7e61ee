"""Speech data: offline synthesized corpora and loaders for SUPERB-style datasets."""
