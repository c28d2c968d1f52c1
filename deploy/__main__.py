from arq_deploy.cli import main

main()
