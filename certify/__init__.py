"""arq_deploy.certify."""
