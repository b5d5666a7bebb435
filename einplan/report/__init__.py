"""Views for people: compile summaries, graph listings, cost tables."""
