"""arq_deploy.search."""
