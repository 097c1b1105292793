"""Stages: one module per stage kind (its config model beside its ``run``), the loops they share
(``training``: offline; ``online``: the one iteration loop) and the registry of kinds (``registry``)."""
