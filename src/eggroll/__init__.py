"""eggroll: evolution strategies with low-rank perturbations (EGGROLL) in JAX."""

from . import layers, noise, shaping
from .checkpoint import load_checkpoint, save_checkpoint
from .layers import dense, embed, linear, param
from .noise import FROZEN, FULL, LOWRANK, Full, LowRank, NoiseContext, materialize
from .population import evaluate_population, population_mesh
from .shaping import antithetic_diff, antithetic_sign, centered_rank, group_z_score, raw, z_score
from .int8 import apply_steps
from .int8_strategy import IntESState
from .strategy import ES, ESState, STRATEGIES, eggroll, int8_eggroll, make_strategy, open_es

__version__ = "0.1.0"

__all__ = [
    "layers", "noise", "shaping",
    "load_checkpoint", "save_checkpoint",
    "dense", "embed", "linear", "param",
    "FROZEN", "FULL", "LOWRANK", "Full", "LowRank", "NoiseContext", "materialize",
    "evaluate_population", "population_mesh",
    "antithetic_diff", "antithetic_sign", "centered_rank", "group_z_score", "raw", "z_score",
    "apply_steps", "IntESState",
    "ES", "ESState", "STRATEGIES", "eggroll", "int8_eggroll", "make_strategy", "open_es",
]
