from arq_deploy.app.cli import main

main()
