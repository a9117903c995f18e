from polykv_cli.main import main

main()
