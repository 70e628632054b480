"""Training recipes: one readable file per task, runnable as `eggroll train NAME [flags]`.

A recipe module exposes

    Config          a dataclass; its fields become the command-line flags (field metadata
                    "help" and "choices" are used), so `eggroll train NAME --help` lists them;
    make_train(cfg) the pieces (initial state, the jitted generation step, evaluation...), for
                    use from Python / notebooks / tests;
    run(cfg)        trains with logging (eggroll.runlog), checkpoints and `--resume`, and returns
                    a JSON-able dict (the CLI prints it as its last line).

Recipes are registered in eggroll.cli.RECIPES:

    cartpole   MLP policy on gymnax CartPole-v1, EGGROLL (default) or --strategy open_es.
"""
