"""Models written with eggroll.layers: each takes (params, x, noise=None) for one example."""
