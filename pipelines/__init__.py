"""What to compute: stage loops, pure algorithm math, and the shipped YAML pipelines."""
