"""The technique API: techniques and their registry, sites, parameter roles and kinds, layer
selectors, the stack schema and the errors a user can see."""
