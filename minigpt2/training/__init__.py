"""A training run: the loop, its schedule, the run folder and data-parallel training.

``loop``: ``TrainConfig``, ``train_step``, the learning-rate schedule and ``train``;
``checkpoint``: crash-safe saves and loading a model folder; ``distributed``: data parallel under
``mpiexec``; ``sizing``: parameters, memory and FLOPs of a configuration.
"""
