"""arq_deploy.targets."""
