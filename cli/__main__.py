from hypersort_core.cli.main import main

main()
