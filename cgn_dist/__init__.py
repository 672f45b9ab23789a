"""cgn_dist: Counterfactual Generative Networks (Sauer & Geiger, ICLR 2021) at cluster scale."""
__version__ = "0.1.0"
