from alignctl.cli.main import main

main()
