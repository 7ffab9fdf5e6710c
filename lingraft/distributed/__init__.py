"""Running lingraft's work units on more than one machine (Ray). Optional: ``pip install 'lingraft[ray]'``."""
