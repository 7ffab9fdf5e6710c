"""The bound methods of the engine, by name: the one list that the CLI, the experiments and the checks share.

Kept free of torch so that command-line option parsing can import it without the engine.
"""

#: interval bound propagation, CROWN (linear relaxation, backward), CROWN with optimised ReLU slopes
METHODS = ("ibp", "crown", "alpha-crown")
