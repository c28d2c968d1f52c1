"""arq_deploy.export."""
