"""Scaling-law science: IsoFLOP sweep plans, the results table and the Chinchilla fits (numpy, scipy, matplotlib; no Ray)."""
