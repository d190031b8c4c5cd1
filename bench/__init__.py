"""`make bench`: reloader against the in-process limit and its peers, side by side in one run."""
