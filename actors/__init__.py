"""Role classes that run inside Ray actors: plain Python classes, wrapped with ray.remote at spawn time."""
