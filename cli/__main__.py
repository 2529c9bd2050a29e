from hypersort_core.cli.main import main

if __name__ == "__main__":  # processes that prepare cases import this module again
    main()
