"""The driver: config, plan, runner, tracking, CLI. The only package (with the actor wrapper) that imports Ray."""
