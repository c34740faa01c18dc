"""Reconstruction quality of a token dataset: metrics, pictures and the HTML report."""
