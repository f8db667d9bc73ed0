"""gwnet: Graph WaveNet for spatio-temporal traffic forecasting."""
__version__ = "0.1.0"
