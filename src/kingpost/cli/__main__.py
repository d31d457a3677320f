from kingpost.cli.main import main

main()
