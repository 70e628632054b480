"""Tasks: turn a model and its population noise into fitness.

    rl   JAX RL environments (gymnax, brax, jumanji, navix, craftax, kinetix, jaxmarl MPE) behind
         one interface (`make_env`), jitted rollouts and population fitness.
"""
