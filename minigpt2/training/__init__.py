"""A training run: the loop, its step and schedule, the run folder and data-parallel training.

``loop``: ``train``, the loop of the ``train`` command, and ``setup``, which builds a run;
``settings``: ``TrainConfig`` (every setting of a run) and ``Session`` (this invocation's flags);
``step``: ``train_step`` and the learning-rate schedule ``lr_at``; ``run_folder``: the --out
folder's lock, log, saves, resume checks and signals; ``checkpoint``: crash-safe checkpoint files
and loading a model folder; ``data_parallel``: the gradient average and ZeRO-1 over processes;
``distributed``: the processes under ``mpiexec`` and their communicators; ``sizing``:
parameters, memory and FLOPs of a configuration.
"""
