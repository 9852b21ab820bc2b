"""Pool: the model-server fleet (health, slots, routing, load/unload)."""
