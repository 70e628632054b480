"""eggroll: evolution strategies with low-rank perturbations (EGGROLL) in JAX."""

from . import layers, noise, shaping
from .checkpoint import load_checkpoint, save_checkpoint
from .layers import dense, embed, linear, param
from .noise import FROZEN, FULL, LOWRANK, Full, LowRank, materialize
from .population import evaluate_population, population_mesh
from .shaping import antithetic_diff, antithetic_sign, centered_rank, group_z_score, raw, z_score
from .strategy import ES, ESState, STRATEGIES, eggroll, open_es

__version__ = "0.1.0"

__all__ = [
    "layers", "noise", "shaping",
    "load_checkpoint", "save_checkpoint",
    "dense", "embed", "linear", "param",
    "FROZEN", "FULL", "LOWRANK", "Full", "LowRank", "materialize",
    "evaluate_population", "population_mesh",
    "antithetic_diff", "antithetic_sign", "centered_rank", "group_z_score", "raw", "z_score",
    "ES", "ESState", "STRATEGIES", "eggroll", "open_es",
]
