"""geolora: Riemannian optimization of low-rank adapters."""
