"""Redis access for moemesh: the embedded server launcher and the cache tiers."""
