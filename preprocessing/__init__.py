"""Data preparation scripts, one per source; each runs as `python preprocessing/X.py --help`."""
