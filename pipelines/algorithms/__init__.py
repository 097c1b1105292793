"""Pure tensor functions: losses, estimators, selection rules. They never receive a config object."""
