"""After training: serving, exporting, and running raylm on a cluster.

serve (Ray Serve HTTP generation endpoint) | export (Hugging Face or raylm folder) |
submit (any raylm command as a Ray Job on a cluster)
"""
