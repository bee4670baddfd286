"""The course's graders (``exercises`` for notebooks 01-07, ``advanced`` for 08-12) and the
learner's own layers as a layer set for the model (``own_layers``, notebook 07's payoff)."""
